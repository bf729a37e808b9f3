from __future__ import annotations

import pytest
import torch
from _asserts import (
    assert_close,
    assert_non_differentiable,
    assert_permutation_invariant,
    assert_returns_row_for_single_row,
    assert_scale_equivariant,
    assert_weighting_permutation_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import G_BASE, J_BASE, SCALES, matrices, sample
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import IMTLG, IMTLGWeighting


def test_reference_values() -> None:
    assert_close(IMTLG()(J_BASE), torch.tensor([0.0767, 1.0, 1.0]), atol=1e-4)
    assert_close(IMTLGWeighting()(G_BASE), torch.tensor([0.5923, 0.4077]), atol=1e-4)


def test_edge_cases() -> None:
    assert_zero_for_zero_matrix(IMTLG(), 3, 4)
    assert torch.equal(IMTLGWeighting()(torch.zeros(3, 3)), torch.zeros(3))
    assert torch.equal(IMTLG()(torch.zeros(0, 3)), torch.zeros(3))
    assert IMTLG()(torch.zeros(2, 0)).shape == (0,)
    assert_returns_row_for_single_row(IMTLG(), torch.tensor([3.0, -1.0, 2.0]), rtol=1e-5)


def test_repr() -> None:
    assert repr(IMTLG()) == "IMTLG()"
    assert str(IMTLG()) == "IMTLG"
    assert repr(IMTLGWeighting()) == "IMTLGWeighting()"


@settings(max_examples=40, deadline=None)
@given(matrices(min_rows=1, max_rows=8, min_cols=8, max_cols=16, kinds=("full",), scales=SCALES))
def test_equal_projections_on_unit_rows(matrix: Tensor) -> None:
    # For linearly independent rows, the result has the same projection on every unit row (its
    # sign is that of the sum of the unnormalised weights, which may be negative).
    result = IMTLG()(matrix)
    projections = matrix @ result / matrix.norm(dim=1)
    assert_close(projections, projections.mean().expand_as(projections), atol=0.0, rtol=1e-6)
    assert_close(IMTLG().weighting(matrix).sum(), torch.tensor(1.0, dtype=matrix.dtype), atol=1e-9)


@pytest.mark.parametrize("scale", [1e-15, 1e12, 1e15])
def test_extreme_scales_are_not_zeroed(scale: float) -> None:
    # The reference zeroed the weights when |Σ v| < 1e-12, i.e. for every Jacobian of norm above
    # about 1e12; the threshold is relative to ‖J‖ here.
    matrix = sample("full", 3, 5, seed=0)
    assert_close(IMTLG()(scale * matrix), scale * IMTLG()(matrix), atol=0.0, rtol=1e-9)


def test_duplicated_rows_do_not_change_the_result() -> None:
    # The pseudo-inverse spreads the weight of a row equally over its copies.
    matrix = sample("full", 3, 6, seed=1)
    duplicated = matrix[torch.tensor([0, 1, 1, 2, 0])]
    assert_close(IMTLG()(duplicated), IMTLG()(matrix), atol=0.0, rtol=1e-8)


@settings(max_examples=20, deadline=None)
@given(matrices(min_rows=1, max_rows=16, max_cols=16, scales=SCALES))
def test_invariances(matrix: Tensor) -> None:
    assert_permutation_invariant(IMTLG(), matrix, n_permutations=2, rtol=1e-6)
    assert_scale_equivariant(IMTLG(), matrix, factors=(1e-3, 1e3), rtol=1e-6)
    assert_weighting_permutation_equivariant(
        IMTLGWeighting(), matrix @ matrix.T, n_permutations=2, atol=1e-6
    )


def test_non_differentiable_but_weighting_keeps_history() -> None:
    assert_non_differentiable(IMTLG(), sample("full", 3, 4))
    gramian = G_BASE.clone().requires_grad_(True)
    weights = IMTLGWeighting()(gramian)
    assert weights.requires_grad
    (gradient,) = torch.autograd.grad(weights[0], gramian)
    assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = IMTLG()(J_BASE.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.tensor([0.0767, 1.0, 1.0]).double(), atol=1e-2)
    weights = IMTLGWeighting()(G_BASE.to(dtype))
    assert weights.dtype == dtype
    assert_close(weights.double(), torch.tensor([0.5923, 0.4077]).double(), atol=1e-2)
