from __future__ import annotations

import re

import pytest
import torch
from _asserts import (
    assert_close,
    assert_differentiable,
    assert_linear_under_scaling,
    assert_scale_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import J_BASE, SCALES, matrices
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import Constant, ConstantWeighting


def test_reference_values() -> None:
    assert_close(Constant(torch.tensor([1.0, 2.0]))(J_BASE), torch.tensor([8.0, 3.0, 3.0]), atol=0)


def test_weighting_returns_the_stored_tensor() -> None:
    weights = torch.tensor([1.0, 2.0, 3.0])
    weighting = ConstantWeighting(weights)
    assert weighting(torch.zeros(3, 5)) is weights
    assert weighting(torch.zeros(3, 3)) is weights
    assert weighting.weights is weights


def test_validation() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Parameter `weights` should be a 1-dimensional tensor. Found `weights.shape = "
            "torch.Size([])`."
        ),
    ):
        Constant(torch.tensor(1.0))
    with pytest.raises(ValueError, match="1-dimensional"):
        ConstantWeighting(torch.ones(2, 2))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Parameter `matrix` should have 3 rows (the number of specified weights). Found "
            "`matrix` with 2 rows."
        ),
    ):
        Constant(torch.ones(3))(J_BASE)


def test_empty_weights() -> None:
    assert torch.equal(Constant(torch.zeros(0))(torch.zeros(0, 3)), torch.zeros(3))


def test_repr() -> None:
    aggregator = Constant(torch.tensor([1.0, 2.0]))
    assert repr(aggregator) == "Constant(weights=tensor([1., 2.]))"
    assert str(aggregator) == "Constant([1., 2.])"
    assert str(Constant(torch.tensor([0.125, 10.0, 0.333]))) == "Constant([0.12, 10., 0.33])"
    assert repr(ConstantWeighting(torch.tensor([1.0]))) == "ConstantWeighting()"


@settings(max_examples=20, deadline=None)
@given(matrices(min_rows=1, max_rows=32, max_cols=8, scales=SCALES))
def test_properties(matrix: Tensor) -> None:
    weights = torch.linspace(-1.0, 2.0, matrix.shape[0], dtype=matrix.dtype)
    aggregator = Constant(weights)
    assert_close(aggregator(matrix), weights @ matrix, atol=0.0, rtol=1e-12)
    assert_linear_under_scaling(aggregator, matrix, rtol=1e-9)
    assert_scale_equivariant(aggregator, matrix, rtol=1e-12)
    assert_zero_for_zero_matrix(aggregator, matrix.shape[0], 3)


def test_differentiable() -> None:
    gradient = assert_differentiable(Constant(torch.tensor([1.0, 2.0])), J_BASE)
    assert_close(gradient, torch.tensor([[1.0] * 3, [2.0] * 3]), atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = Constant(torch.tensor([1.0, 2.0], dtype=dtype))(J_BASE.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.tensor([8.0, 3.0, 3.0], dtype=torch.float64), atol=0)
