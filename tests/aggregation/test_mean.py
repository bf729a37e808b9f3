from __future__ import annotations

import pytest
import torch
from _asserts import (
    assert_close,
    assert_differentiable,
    assert_linear_under_scaling,
    assert_permutation_invariant,
    assert_returns_row_for_single_row,
    assert_scale_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import G_BASE, J_BASE, SCALES, matrices
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import Mean, MeanWeighting


def test_reference_values() -> None:
    assert_close(Mean()(J_BASE), torch.tensor([1.0, 1.0, 1.0]), atol=1e-6)
    assert_close(MeanWeighting()(G_BASE), torch.tensor([0.5, 0.5]), atol=0)
    assert_close(MeanWeighting()(J_BASE), torch.tensor([0.5, 0.5]), atol=0)


def test_edge_cases() -> None:
    with pytest.raises(ZeroDivisionError):
        Mean()(torch.zeros(0, 3))
    assert Mean()(torch.zeros(3, 0)).shape == (0,)
    assert_zero_for_zero_matrix(Mean(), 3, 2)
    assert_returns_row_for_single_row(Mean(), torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="dimension 2"):
        Mean()(torch.ones(3))


def test_repr() -> None:
    assert repr(Mean()) == "Mean()"
    assert str(Mean()) == "Mean"
    assert repr(MeanWeighting()) == "MeanWeighting()"
    assert isinstance(Mean().weighting, MeanWeighting)


@settings(max_examples=20, deadline=None)
@given(matrices(min_rows=1, max_rows=64, max_cols=16, scales=SCALES))
def test_properties(matrix: Tensor) -> None:
    assert_close(Mean()(matrix), matrix.mean(dim=0), atol=0.0, rtol=1e-12)
    assert_permutation_invariant(Mean(), matrix, rtol=1e-12)
    assert_linear_under_scaling(Mean(), matrix, rtol=1e-12)
    assert_scale_equivariant(Mean(), matrix, rtol=1e-12)


def test_differentiable() -> None:
    gradient = assert_differentiable(Mean(), J_BASE)
    assert_close(gradient, torch.full((2, 3), 0.5), atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = Mean()(J_BASE.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.ones(3, dtype=torch.float64), atol=0)
    assert MeanWeighting()(G_BASE.to(dtype)).dtype == dtype
