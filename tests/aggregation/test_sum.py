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

from torchjd.aggregation import Sum, SumWeighting


def test_reference_values() -> None:
    assert_close(Sum()(J_BASE), torch.tensor([2.0, 2.0, 2.0]), atol=0)
    assert_close(SumWeighting()(G_BASE), torch.tensor([1.0, 1.0]), atol=0)


def test_edge_cases() -> None:
    assert torch.equal(Sum()(torch.zeros(0, 3)), torch.zeros(3))
    assert Sum()(torch.zeros(3, 0)).shape == (0,)
    assert_zero_for_zero_matrix(Sum(), 3, 2)
    assert_returns_row_for_single_row(Sum(), torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="dimension 2"):
        Sum()(torch.ones(2, 2, 2))


def test_repr() -> None:
    assert repr(Sum()) == "Sum()"
    assert str(Sum()) == "Sum"
    assert repr(SumWeighting()) == "SumWeighting()"
    assert isinstance(Sum().weighting, SumWeighting)


@settings(max_examples=20, deadline=None)
@given(matrices(min_rows=1, max_rows=64, max_cols=16, scales=SCALES))
def test_properties(matrix: Tensor) -> None:
    assert_close(Sum()(matrix), matrix.sum(dim=0), atol=0.0, rtol=1e-12)
    assert_permutation_invariant(Sum(), matrix, rtol=1e-12)
    assert_linear_under_scaling(Sum(), matrix, rtol=1e-12)
    assert_scale_equivariant(Sum(), matrix, rtol=1e-12)


def test_differentiable() -> None:
    gradient = assert_differentiable(Sum(), J_BASE)
    assert_close(gradient, torch.ones(2, 3), atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = Sum()(J_BASE.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.full((3,), 2.0, dtype=torch.float64), atol=0)
    assert SumWeighting()(G_BASE.to(dtype)).dtype == dtype
