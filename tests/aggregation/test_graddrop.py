from __future__ import annotations

import re

import pytest
import torch
from _asserts import (
    assert_close,
    assert_non_differentiable,
    assert_returns_row_for_single_row,
    assert_zero_for_zero_matrix,
)
from _matrices import J_BASE, SCALES, matrices, sample
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import GradDrop
from torchjd.aggregation._graddrop import _identity


def _graddrop_reference(matrix: Tensor, leak: Tensor | None = None) -> Tensor:
    """The spec's algorithm with explicit loops over columns and rows."""
    m, n = matrix.shape
    leak = torch.zeros(m, dtype=matrix.dtype) if leak is None else leak.to(matrix.dtype)
    thresholds = torch.rand(n, dtype=matrix.dtype)
    result = torch.zeros(n, dtype=matrix.dtype)
    for j in range(n):
        column = matrix[:, j]
        purity = 0.5 * (1 + column.sum() / column.abs().sum())
        for i in range(m):
            value = column[i]
            kept = (purity > thresholds[j] and value > 0) or (purity < thresholds[j] and value < 0)
            result[j] += (leak[i] + (1 - leak[i]) * float(kept)) * value
    return result


def test_reference_values() -> None:
    torch.manual_seed(0)
    assert_close(GradDrop()(J_BASE), torch.tensor([6.0, 2.0, 2.0]), atol=1e-4)
    torch.manual_seed(0)
    float64_result = GradDrop()(J_BASE.double())
    assert_close(float64_result, torch.tensor([-4.0, 2.0, 2.0], dtype=torch.float64), atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(matrices(min_rows=1, max_rows=8, max_cols=8, scales=SCALES))
def test_matches_reference_and_draws_once(matrix: Tensor) -> None:
    n = matrix.shape[1]
    generator_leak = torch.Generator().manual_seed(n)
    for leak in [None, torch.rand(matrix.shape[0], generator=generator_leak, dtype=torch.float64)]:
        torch.manual_seed(7)
        expected = _graddrop_reference(matrix, leak)
        state_after_reference = torch.get_rng_state()
        torch.manual_seed(7)
        actual = GradDrop(leak=leak)(matrix)
        assert torch.equal(torch.get_rng_state(), state_after_reference)
        scale = matrix.abs().max().item() * matrix.shape[0]
        assert_close(actual, expected, atol=0.0, rtol=1e-12, scale=scale)


@settings(max_examples=20, deadline=None)
@given(matrices(min_rows=1, max_rows=8, max_cols=8))
def test_each_column_keeps_its_positive_or_its_negative_part(matrix: Tensor) -> None:
    result = GradDrop()(matrix)
    positive_parts = matrix.clamp(min=0).sum(dim=0)
    negative_parts = matrix.clamp(max=0).sum(dim=0)
    is_either = torch.isclose(result, positive_parts, rtol=1e-12, atol=0) | torch.isclose(
        result, negative_parts, rtol=1e-12, atol=0
    )
    assert is_either.all()


def test_full_leak_is_the_sum() -> None:
    matrix = sample("full", 4, 6, seed=1)
    result = GradDrop(leak=torch.ones(4))(matrix)
    assert_close(result, matrix.sum(dim=0), atol=1e-12)


def test_pure_columns_are_kept() -> None:
    # A column of positive entries has purity 1 > U; one of negative entries has purity 0 < U.
    matrix = torch.tensor([[1.0, -2.0], [3.0, -4.0], [0.5, 0.0]])
    for seed in range(5):
        torch.manual_seed(seed)
        assert_close(GradDrop()(matrix), torch.tensor([4.5, -6.0]), atol=0)


def test_custom_f() -> None:
    matrix = sample("full", 5, 6, seed=2)
    always_positive = GradDrop(f=lambda purity: torch.ones_like(purity))
    assert_close(always_positive(matrix), matrix.clamp(min=0).sum(dim=0), atol=1e-12)
    always_negative = GradDrop(f=lambda purity: -torch.ones_like(purity))
    assert_close(always_negative(matrix), matrix.clamp(max=0).sum(dim=0), atol=1e-12)


def test_empty_matrices_give_zeros_without_drawing() -> None:
    state = torch.get_rng_state()
    assert torch.equal(GradDrop()(torch.zeros(0, 3)), torch.zeros(3))
    assert GradDrop()(torch.zeros(3, 0)).shape == (0,)
    assert torch.equal(torch.get_rng_state(), state)


def test_edge_cases() -> None:
    assert_zero_for_zero_matrix(GradDrop(), 3, 4)
    assert_returns_row_for_single_row(GradDrop(), torch.tensor([3.0, -1.0, 0.0, 2.0]))


def test_validation() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Parameter `leak` should be a 1-dimensional tensor. Found `leak.shape = "
            "torch.Size([2, 2])`."
        ),
    ):
        GradDrop(leak=torch.ones(2, 2))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Parameter `matrix` should be a matrix of exactly 3 rows (i.e. the number of leak "
            "scalars). Found `matrix` of shape `torch.Size([2, 3])`."
        ),
    ):
        GradDrop(leak=torch.ones(3))(torch.ones(2, 3))
    with pytest.raises(ValueError, match="dimension 2"):
        GradDrop()(torch.ones(3))


def test_repr_and_str() -> None:
    assert _identity.__name__ == "_identity" and _identity.__qualname__ == "_identity"
    assert re.fullmatch(
        r"GradDrop\(f=<function _identity at 0x[0-9a-fA-F]+>, leak=None\)", repr(GradDrop())
    )
    leak = torch.tensor([0.0, 1.0])
    assert re.fullmatch(
        r"GradDrop\(f=<function _identity at 0x[0-9a-fA-F]+>, leak=tensor\(\[0\., 1\.\]\)\)",
        repr(GradDrop(leak=leak)),
    )
    assert str(GradDrop()) == "GradDrop"
    assert str(GradDrop(leak=leak)) == "GradDrop([0., 1.])"
    assert str(GradDrop(leak=torch.tensor([0.125, 0.333]))) == "GradDrop([0.12, 0.33])"


def test_non_differentiable() -> None:
    assert_non_differentiable(GradDrop(), sample("full", 3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    result = GradDrop(leak=torch.tensor([0.5, 0.25]))(J_BASE.to(dtype))
    assert result.dtype == dtype
    if dtype in (torch.float16, torch.bfloat16):
        # Low-precision matrices draw in float32: the same result as float32.
        torch.manual_seed(0)
        expected = GradDrop(leak=torch.tensor([0.5, 0.25]))(J_BASE)
        assert_close(result.float(), expected, atol=1e-2)
