from __future__ import annotations

import re

import pytest
import torch
from _asserts import (
    assert_close,
    assert_differentiable,
    assert_permutation_invariant,
    assert_returns_row_for_single_row,
    assert_scale_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import SCALES, matrices
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from torchjd.aggregation import Mean, TrimmedMean


def _trimmed_mean_reference(matrix: Tensor, trim_number: int) -> Tensor:
    """Column by column, with Python's sort."""
    m, n = matrix.shape
    result = []
    for j in range(n):
        values = sorted(matrix[:, j].tolist())[trim_number : m - trim_number]
        result.append(sum(values) / len(values))
    return torch.tensor(result, dtype=matrix.dtype)


def test_reference_values() -> None:
    matrix = torch.tensor([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])
    assert_close(TrimmedMean(1)(matrix), torch.tensor([1.5, 2.5]), atol=1e-4)


def test_validation() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Parameter `trim_number` should be a non-negative integer. Found `trim_number` = -1`."
        ),
    ):
        TrimmedMean(-1)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Parameter `matrix` should be a matrix of at least 3 rows (i.e. `2 * trim_number + 1`)."
            " Found `matrix` of shape `torch.Size([2, 3])`."
        ),
    ):
        TrimmedMean(1)(torch.ones(2, 3))
    with pytest.raises(ValueError, match="dimension 2"):
        TrimmedMean(0)(torch.ones(3))
    with pytest.raises(ValueError):
        TrimmedMean(0)(torch.zeros(0, 3))


def test_repr_and_attributes() -> None:
    assert repr(TrimmedMean(2)) == "TrimmedMean(trim_number=2)"
    assert str(TrimmedMean(2)) == "TM2"
    assert TrimmedMean(3).trim_number == 3


def test_edge_cases() -> None:
    assert_zero_for_zero_matrix(TrimmedMean(1), 3, 4)
    assert TrimmedMean(1)(torch.zeros(3, 0)).shape == (0,)
    assert_returns_row_for_single_row(TrimmedMean(0), torch.tensor([3.0, -1.0, 2.0]))


@settings(max_examples=40, deadline=None)
@given(matrices(min_rows=1, max_rows=32, max_cols=8, scales=SCALES), st.data())
def test_matches_reference(matrix: Tensor, data: st.DataObject) -> None:
    trim_number = data.draw(st.integers(0, (matrix.shape[0] - 1) // 2), label="trim_number")
    expected = _trimmed_mean_reference(matrix, trim_number)
    result = TrimmedMean(trim_number)(matrix)
    assert_close(result, expected, atol=0.0, rtol=1e-12, scale=matrix.abs().max().item())
    assert_permutation_invariant(TrimmedMean(trim_number), matrix, n_permutations=2, rtol=1e-12)
    assert_scale_equivariant(TrimmedMean(trim_number), matrix, factors=(1e-3, 1e3), rtol=1e-12)


def test_no_trimming_is_the_mean() -> None:
    matrix = torch.randn(7, 5, dtype=torch.float64)
    assert_close(TrimmedMean(0)(matrix), Mean()(matrix), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    n_honest=st.integers(1, 10),
    trim_number=st.integers(0, 4),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_robust_to_trim_number_arbitrary_rows(
    n_honest: int, trim_number: int, n: int, seed: int
) -> None:
    # With at most trim_number adversarial rows among at least 2 * trim_number + 1, every
    # coordinate of the result lies within the range of the honest values of its column.
    generator = torch.Generator().manual_seed(seed)
    n_honest = max(n_honest, trim_number + 1)
    honest = torch.randn(n_honest, n, generator=generator, dtype=torch.float64)
    signs = torch.randint(0, 2, (trim_number, n), generator=generator) * 2 - 1
    adversarial = signs * 10 ** torch.randint(0, 12, (trim_number, n), generator=generator)
    matrix = torch.cat([honest, adversarial.double()])
    result = TrimmedMean(trim_number)(matrix)
    assert (result >= honest.min(dim=0).values - 1e-12).all()
    assert (result <= honest.max(dim=0).values + 1e-12).all()


def test_differentiable() -> None:
    matrix = torch.tensor([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [4.0, 6.0]])
    gradient = assert_differentiable(TrimmedMean(1), matrix)
    # Only the middle two values of each column are averaged.
    expected = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.0, 0.0]])
    assert_close(gradient, expected, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    matrix = torch.tensor([[1.0, 3.0], [100.0, -100.0], [-100.0, 100.0], [2.0, 2.0]], dtype=dtype)
    result = TrimmedMean(1)(matrix)
    assert result.dtype == dtype
    assert_close(result.double(), torch.tensor([1.5, 2.5], dtype=torch.float64), atol=0)
