from __future__ import annotations

import pytest
import torch
from _asserts import (
    assert_close,
    assert_non_conflicting,
    assert_non_differentiable,
    assert_permutation_invariant,
    assert_returns_row_for_single_row,
    assert_scale_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import J_BASE, SCALES, matrices, sample
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import ConFIG, ConstantWeighting, SumWeighting


def test_reference_values() -> None:
    assert_close(ConFIG()(J_BASE), torch.tensor([0.1588, 2.0706, 2.0706]), atol=1e-4)
    pref = torch.tensor([1.0, 2.0])
    assert_close(ConFIG(pref)(J_BASE), torch.tensor([0.4684, 2.1656, 2.1656]), atol=1e-4)


def test_edge_cases() -> None:
    assert torch.equal(ConFIG()(torch.zeros(0, 3)), torch.zeros(3))
    assert ConFIG()(torch.zeros(3, 0)).shape == (0,)
    assert_zero_for_zero_matrix(ConFIG(), 3, 4)
    assert_returns_row_for_single_row(ConFIG(), torch.tensor([3.0, -1.0, 2.0]), rtol=1e-6)


def test_inputs_that_are_not_matrices_raise() -> None:
    with pytest.raises(IndexError, match="dimension 2"):
        ConFIG()(torch.ones(3))
    with pytest.raises(RuntimeError, match="dimension 2"):
        ConFIG()(torch.ones(2, 2, 2))


def test_repr_str_and_weighting() -> None:
    pref = torch.tensor([1.0, 2.0, 3.0])
    assert repr(ConFIG()) == "ConFIG(pref_vector=None)"
    assert str(ConFIG()) == "ConFIG"
    assert repr(ConFIG(pref)) == "ConFIG(pref_vector=tensor([1., 2., 3.]))"
    assert str(ConFIG(pref)) == "ConFIG([1., 2., 3.])"
    assert isinstance(ConFIG().weighting, SumWeighting)
    assert isinstance(ConFIG(pref).weighting, ConstantWeighting)
    with pytest.raises(ValueError, match="pref_vector"):
        ConFIG(torch.ones(2, 2))
    with pytest.raises(ValueError, match="rows"):
        ConFIG(pref)(J_BASE)


@settings(max_examples=40, deadline=None)
@given(matrices(min_rows=1, max_rows=8, min_cols=8, max_cols=16, kinds=("full",), scales=SCALES))
def test_equal_cosine_similarities_and_length(matrix: Tensor) -> None:
    # For linearly independent rows, the unit rows solve Û û ∝ 1: the result has the same cosine
    # similarity with every row (so it is non-conflicting), and its norm is Σ_i g_iᵀ û.
    result = ConFIG()(matrix)
    unit_direction = result / result.norm()
    cosines = matrix @ unit_direction / matrix.norm(dim=1)
    assert_close(cosines, cosines.mean().expand_as(cosines), atol=0.0, rtol=1e-6)
    assert cosines.min() > 0
    assert_non_conflicting(ConFIG(), matrix, rtol=1e-9)
    assert_close(result.norm(), (matrix @ unit_direction).sum(), atol=0.0, rtol=1e-9)


def test_cosine_similarities_follow_the_preference_vector() -> None:
    matrix = sample("full", 3, 6, seed=3)
    pref = torch.tensor([1.0, 2.0, 0.5])
    result = ConFIG(pref)(matrix)
    cosines = matrix @ result / (matrix.norm(dim=1) * result.norm())
    assert_close(cosines / cosines[0], pref.double(), atol=1e-9)


def test_zero_rows_are_ignored() -> None:
    matrix = sample("full", 3, 5, seed=4)
    with_zero_row = torch.cat([matrix[:1], torch.zeros(1, 5, dtype=matrix.dtype), matrix[1:]])
    assert_close(ConFIG()(with_zero_row), ConFIG()(matrix), atol=0.0, rtol=1e-9)


@settings(max_examples=20, deadline=None)
@given(matrices(min_rows=1, max_rows=16, max_cols=16, scales=SCALES))
def test_invariances(matrix: Tensor) -> None:
    assert_permutation_invariant(ConFIG(), matrix, n_permutations=2, rtol=1e-6)
    assert_scale_equivariant(ConFIG(), matrix, factors=(1e-3, 1e3), rtol=1e-6)


def test_non_differentiable() -> None:
    assert_non_differentiable(ConFIG(), sample("full", 3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = ConFIG()(J_BASE.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.tensor([0.1588, 2.0706, 2.0706]).double(), atol=2e-2)
    pref = torch.tensor([1.0, 2.0])
    result_with_pref = ConFIG(pref)(J_BASE.to(dtype))
    assert result_with_pref.dtype == dtype
    expected_with_pref = torch.tensor([0.4684, 2.1656, 2.1656]).double()
    assert_close(result_with_pref.double(), expected_with_pref, atol=2e-2)
