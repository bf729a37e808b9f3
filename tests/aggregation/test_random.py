from __future__ import annotations

import pytest
import torch
from _asserts import (
    assert_close,
    assert_differentiable,
    assert_in_simplex,
    assert_returns_row_for_single_row,
    assert_zero_for_zero_matrix,
)
from _matrices import J_BASE, matrices
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import Random, RandomWeighting


def test_reference_values() -> None:
    torch.manual_seed(0)
    assert_close(Random()(J_BASE), torch.tensor([-2.6229, 1.0, 1.0]), atol=1e-4)
    torch.manual_seed(0)
    assert_close(RandomWeighting()(J_BASE), torch.tensor([0.8623, 0.1377]), atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(matrices(min_rows=1, max_rows=64, max_cols=8))
def test_softmax_of_one_normal_draw_per_call(matrix: Tensor) -> None:
    m = matrix.shape[0]
    torch.manual_seed(5)
    expected_weights = torch.softmax(torch.randn(m, dtype=matrix.dtype), dim=0)
    state_after_one_draw = torch.get_rng_state()
    torch.manual_seed(5)
    weights = RandomWeighting()(matrix)
    assert torch.equal(torch.get_rng_state(), state_after_one_draw)
    assert torch.equal(weights, expected_weights)
    assert_in_simplex(weights, atol=1e-12)
    assert (weights > 0).all()
    torch.manual_seed(5)
    assert_close(Random()(matrix), expected_weights @ matrix, atol=0.0, rtol=1e-12)


def test_successive_calls_differ() -> None:
    torch.manual_seed(0)
    weighting = RandomWeighting()
    assert not torch.equal(weighting(torch.zeros(4, 2)), weighting(torch.zeros(4, 2)))


def test_only_the_number_of_rows_is_used() -> None:
    torch.manual_seed(1)
    from_matrix = RandomWeighting()(torch.randn(3, 7))
    torch.manual_seed(1)
    _ = torch.randn(3, 7)
    from_gramian = RandomWeighting()(torch.zeros(3, 3))
    assert torch.equal(from_matrix, from_gramian)


def test_edge_cases() -> None:
    assert_returns_row_for_single_row(Random(), torch.tensor([3.0, -1.0, 2.0]))
    assert_zero_for_zero_matrix(Random(), 4, 3)
    assert torch.equal(Random()(torch.zeros(0, 3)), torch.zeros(3))
    assert Random()(torch.zeros(3, 0)).shape == (0,)


def test_repr() -> None:
    assert repr(Random()) == "Random()"
    assert str(Random()) == "Random"
    assert repr(RandomWeighting()) == "RandomWeighting()"


def test_differentiable() -> None:
    torch.manual_seed(0)
    gradient = assert_differentiable(Random(), J_BASE)
    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(2), dim=0)
    assert_close(gradient, weights.unsqueeze(1).expand(2, 3), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    result = Random()(J_BASE.to(dtype))
    assert result.dtype == dtype
    torch.manual_seed(0)
    weights = RandomWeighting()(J_BASE.to(dtype))
    assert weights.dtype == dtype
    assert_in_simplex(weights.double(), atol=1e-2)
    if dtype in (torch.float16, torch.bfloat16):
        # Low-precision inputs draw in float32: the same weights as float32, rounded.
        assert_close(result.double(), torch.tensor([-2.6229, 1.0, 1.0]).double(), atol=2e-2)
