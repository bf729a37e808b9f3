from __future__ import annotations

import pytest
import torch
from _asserts import (
    assert_close,
    assert_differentiable,
    assert_permutation_invariant,
    assert_returns_row_for_single_row,
    assert_scale_equivariant,
    assert_weighting_permutation_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import G_BASE, J_BASE, SCALES, matrices, sample
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import AlignedMTL, AlignedMTLWeighting, ConstantWeighting, MeanWeighting


def _balance_matrix(gramian: Tensor) -> Tensor:
    """The balance matrix B, read through the public API: column i is the weighting of e_i."""
    m = gramian.shape[0]
    identity = torch.eye(m, dtype=gramian.dtype)
    return torch.stack([AlignedMTLWeighting(identity[i])(gramian) for i in range(m)], dim=1)


def test_reference_values() -> None:
    assert_close(AlignedMTL()(J_BASE), torch.tensor([0.2133, 0.9673, 0.9673]), atol=1e-4)
    assert_close(AlignedMTLWeighting()(G_BASE), torch.tensor([0.5591, 0.4083]), atol=1e-4)


def test_zero_gramian_gives_the_preference_weights() -> None:
    assert_close(AlignedMTLWeighting()(torch.zeros(4, 4)), torch.full((4,), 0.25), atol=0.0)
    pref = torch.tensor([1.0, 2.0, 3.0])
    assert_close(AlignedMTLWeighting(pref)(torch.zeros(3, 3)), pref, atol=0.0)
    assert_zero_for_zero_matrix(AlignedMTL(), 3, 5)


def test_edge_cases() -> None:
    assert_returns_row_for_single_row(AlignedMTL(), torch.tensor([3.0, -1.0, 2.0]), rtol=1e-5)
    with pytest.raises(ZeroDivisionError):
        AlignedMTL()(torch.zeros(0, 3))
    assert AlignedMTL()(torch.zeros(3, 0)).shape == (0,)


def test_repr_str_and_structure() -> None:
    pref = torch.tensor([1.0, 2.0, 3.0])
    assert repr(AlignedMTL()) == "AlignedMTL(pref_vector=None)"
    assert str(AlignedMTL()) == "AlignedMTL"
    assert repr(AlignedMTL(pref)) == "AlignedMTL(pref_vector=tensor([1., 2., 3.]))"
    assert str(AlignedMTL(pref)) == "AlignedMTL([1., 2., 3.])"
    assert repr(AlignedMTLWeighting()) == "AlignedMTLWeighting(\n  (weighting): MeanWeighting()\n)"
    assert isinstance(AlignedMTLWeighting().weighting, MeanWeighting)
    assert isinstance(AlignedMTLWeighting(pref).weighting, ConstantWeighting)
    with pytest.raises(ValueError, match="pref_vector"):
        AlignedMTL(torch.ones(2, 2))


@settings(max_examples=40, deadline=None)
@given(matrices(min_rows=1, max_rows=10, max_cols=12, scales=SCALES))
def test_aligned_rows_are_orthogonal_with_equal_norms(matrix: Tensor) -> None:
    # The rows of B J are orthogonal with equal norms on the range of J: B G B = λ_R P, with P the
    # orthogonal projector onto the span of the R eigenvectors of G kept (those above the rank
    # tolerance) and λ_R the smallest kept eigenvalue (for independent rows, B G B = λ_min I).
    gramian = matrix @ matrix.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gramian)
    kept = eigenvalues > eigenvalues.max() * matrix.shape[0] * torch.finfo(torch.float32).eps
    if not kept.any():
        return  # zero Gramian, covered elsewhere
    range_basis = eigenvectors[:, kept]
    expected = eigenvalues[kept].min() * range_basis @ range_basis.T
    balance = _balance_matrix(gramian)
    assert_close(balance @ gramian @ balance, expected, atol=0.0, rtol=1e-6)


def test_full_rank_aligned_rows_are_orthonormal_up_to_a_factor() -> None:
    matrix = sample("full", 4, 9, seed=7)
    gramian = matrix @ matrix.T
    smallest_eigenvalue = torch.linalg.eigvalsh(gramian)[0]
    expected = smallest_eigenvalue * torch.eye(4, dtype=matrix.dtype)
    balance = _balance_matrix(gramian)
    assert_close(balance @ gramian @ balance, expected, atol=0.0, rtol=1e-9)


def test_rank_tolerance_uses_the_default_dtype_epsilon() -> None:
    # In float64 the eigenvalue 1e-8 is far above float64's tolerance but below float32's
    # (2 * 1.19e-7): it is discarded, as in the reference implementation.
    gramian = torch.diag(torch.tensor([1.0, 1e-8], dtype=torch.float64))
    weights = AlignedMTLWeighting()(gramian)
    assert weights.dtype == torch.float64
    assert_close(weights, torch.tensor([0.5, 0.0], dtype=torch.float64), atol=1e-12)
    kept = AlignedMTLWeighting()(torch.diag(torch.tensor([1.0, 1e-5], dtype=torch.float64)))
    assert_close(kept, torch.tensor([0.5 * 1e-5**0.5, 0.5], dtype=torch.float64), atol=1e-12)


def test_linear_in_the_preference_vector() -> None:
    matrix = sample("full", 3, 5, seed=4)
    pref1 = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    pref2 = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    combined = AlignedMTL(2 * pref1 + 3 * pref2)(matrix)
    expected = 2 * AlignedMTL(pref1)(matrix) + 3 * AlignedMTL(pref2)(matrix)
    assert_close(combined, expected, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(matrices(min_rows=1, max_rows=16, max_cols=16, scales=SCALES))
def test_invariances(matrix: Tensor) -> None:
    assert_permutation_invariant(AlignedMTL(), matrix, n_permutations=2, rtol=1e-5)
    assert_scale_equivariant(AlignedMTL(), matrix, factors=(1e-3, 1e3), rtol=1e-5)
    assert_weighting_permutation_equivariant(
        AlignedMTLWeighting(), matrix @ matrix.T, n_permutations=2, atol=1e-6
    )


def test_differentiable_and_weights_carry_history() -> None:
    matrix = sample("full", 3, 5, seed=2)
    assert_differentiable(AlignedMTL(), matrix)
    gramian = (matrix @ matrix.T).requires_grad_(True)
    assert AlignedMTLWeighting()(gramian).requires_grad


def test_gradient_is_finite_for_rank_deficient_matrices() -> None:
    # Discarded eigenvalues must not leak infinities into the backward pass.
    assert_differentiable(AlignedMTL(), torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = AlignedMTL()(J_BASE.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.tensor([0.2133, 0.9673, 0.9673]).double(), atol=2e-2)
    weights = AlignedMTLWeighting()(G_BASE.to(dtype))
    assert weights.dtype == dtype
    assert_close(weights.double(), torch.tensor([0.5591, 0.4083]).double(), atol=1e-2)
