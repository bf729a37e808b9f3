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
from _matrices import SCALES, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from torchjd.aggregation import Krum, KrumWeighting

J_KRUM = torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0], [1.0, 2.0, 3.0], [2.0, 0.0, 1.0]]
)


def _krum_scores_brute_force(matrix: Tensor, n_byzantine: int) -> list[float]:
    """Krum's score of every row, with explicit loops over pairs of rows."""
    m = matrix.shape[0]
    n_closest = m - n_byzantine - 2
    scores = []
    for i in range(m):
        distances = sorted((matrix[i] - matrix[j]).norm().item() for j in range(m) if j != i)
        scores.append(sum(distances[:n_closest]))
    return scores


def test_reference_values() -> None:
    gramian = J_KRUM @ J_KRUM.T
    assert_close(Krum(1, 4)(J_KRUM), torch.tensor([1.25, 0.75, 1.5]), atol=1e-4)
    assert_close(KrumWeighting(1, 4)(gramian), torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25]), atol=0)
    assert_close(Krum(1)(J_KRUM), torch.tensor([1.0, 0.0, 1.0]), atol=1e-4)


def test_ties_follow_topk() -> None:
    assert torch.equal(KrumWeighting(1)(torch.zeros(4, 4)), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert_zero_for_zero_matrix(Krum(1), 4, 3)


def test_validation() -> None:
    with pytest.raises(
        ValueError,
        match=r"^Parameter `n_byzantine` should be a non-negative integer\. Found "
        r"`n_byzantine = -1`\.$",
    ):
        Krum(-1)
    with pytest.raises(
        ValueError,
        match=r"^Parameter `n_selected` should be a positive integer\. Found `n_selected = 0`\.$",
    ):
        KrumWeighting(1, 0)
    with pytest.raises(
        ValueError,
        match=r"^Parameter `gramian` should have at least 4 rows \(n_byzantine \+ 3\)\. Found "
        r"`gramian` with 3 rows\.$",
    ):
        Krum(1)(torch.ones(3, 2))
    with pytest.raises(
        ValueError,
        match=r"^Parameter `gramian` should have at least 5 rows \(n_selected\)\. Found `gramian` "
        r"with 4 rows\.$",
    ):
        Krum(1, 5)(torch.ones(4, 2))
    with pytest.raises(ValueError, match="gramian"):
        Krum(0)(torch.zeros(0, 3))


def test_repr_and_attributes() -> None:
    assert repr(Krum(1, 2)) == "Krum(n_byzantine=1, n_selected=2)"
    assert str(Krum(1, 2)) == "Krum1-2"
    assert str(Krum(0)) == "Krum0-1"
    weighting = Krum(2, 3).gramian_weighting
    assert isinstance(weighting, KrumWeighting)
    assert (weighting.n_byzantine, weighting.n_selected) == (2, 3)
    assert repr(KrumWeighting(1)) == "KrumWeighting()"


def test_edge_shapes() -> None:
    assert Krum(1)(torch.zeros(5, 0)).shape == (0,)
    # With n_byzantine = 0, a 3-row matrix is accepted; a single row is not (it needs 3 rows).
    with pytest.raises(ValueError):
        assert_returns_row_for_single_row(Krum(0), torch.tensor([1.0, 2.0]))
    # Selecting all rows is the mean.
    matrix = sample("full", 5, 3, seed=2)
    assert_close(Krum(1, 5)(matrix), matrix.mean(dim=0), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(3, 16),
    n=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_selection_matches_brute_force(m: int, n: int, seed: int, data: st.DataObject) -> None:
    n_byzantine = data.draw(st.integers(0, m - 3), label="n_byzantine")
    n_selected = data.draw(st.integers(1, m), label="n_selected")
    matrix = sample("full", m, n, seed=seed)
    weights = KrumWeighting(n_byzantine, n_selected)(matrix @ matrix.T)
    selected = torch.nonzero(weights).flatten().tolist()
    assert len(selected) == n_selected
    # The selected rows have the smallest scores (mutual nearest neighbours tie exactly, so the
    # selection itself is only compared through the scores).
    scores = _krum_scores_brute_force(matrix, n_byzantine)
    selected_scores = sorted(scores[i] for i in selected)
    assert selected_scores == pytest.approx(sorted(scores)[:n_selected], rel=1e-9, abs=1e-12)
    expected_weights = torch.full((n_selected,), 1 / n_selected, dtype=torch.float64)
    assert_close(weights[selected], expected_weights, atol=0)


@settings(max_examples=30, deadline=None)
@given(
    n_honest=st.integers(3, 12),
    n_byzantine=st.integers(0, 4),
    n=st.integers(2, 8),
    scale=st.sampled_from(SCALES),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_robust_to_byzantine_rows(
    n_honest: int, n_byzantine: int, n: int, scale: float, seed: int, data: st.DataObject
) -> None:
    # Honest rows are close to a common vector; adversarial rows are far from it and from each
    # other. Krum only selects honest rows, so the result stays near the honest vector.
    n_selected = data.draw(st.integers(1, n_honest - 1), label="n_selected")
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(n, generator=generator, dtype=torch.float64)
    honest = center + 0.01 * torch.randn(n_honest, n, generator=generator, dtype=torch.float64)
    byzantine = 100 * torch.randn(n_byzantine, n, generator=generator, dtype=torch.float64)
    matrix = torch.cat([honest, byzantine]) * scale
    order = torch.randperm(matrix.shape[0], generator=generator)
    weights = KrumWeighting(n_byzantine, n_selected)(matrix[order] @ matrix[order].T)
    is_byzantine = order >= n_honest
    assert torch.equal(weights[is_byzantine], torch.zeros(n_byzantine, dtype=torch.float64))
    result = Krum(n_byzantine, n_selected)(matrix)
    assert (result / scale - center).abs().max() < 0.05


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(6, 12),
    n=st.integers(1, 8),
    scale=st.sampled_from(SCALES),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariances(m: int, n: int, scale: float, seed: int) -> None:
    matrix = sample("full", m, n, scale=scale, seed=seed)
    assert_permutation_invariant(Krum(1, 2), matrix, n_permutations=2, rtol=1e-9)
    assert_scale_equivariant(Krum(1, 2), matrix, factors=(1e-3, 1e3), rtol=1e-9)
    assert_weighting_permutation_equivariant(KrumWeighting(1, 2), matrix @ matrix.T, atol=0.0)


def test_differentiable() -> None:
    gradient = assert_differentiable(Krum(1, 2), J_KRUM)
    # The result is the mean of the two selected rows: each gets 1/2 per unit of output.
    expected = torch.tensor([[0.0] * 3, [0.5] * 3, [0.0] * 3, [0.0] * 3, [0.5] * 3])
    assert_close(gradient, expected, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = Krum(1, 4)(J_KRUM.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.tensor([1.25, 0.75, 1.5]).double(), atol=1e-2)
    # Scaled down: the Gramian's largest entry (about 4.4e5) overflows float16.
    weights = KrumWeighting(1, 4)((J_KRUM @ J_KRUM.T / 1e4).to(dtype))
    assert weights.dtype == dtype
    assert_close(weights.double(), torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25]).double(), atol=0)
