"""The Gramian forms of sequence terms (`_ghost.py`) against the Gram of the materialised rows."""

from __future__ import annotations

import pytest
import torch

from torchjd.autogram._rules import _ghost
from torchjd.autogram._rules._ghost import (
    SequenceTerm,
    ghost_gramian,
    weight_gramian,
    weight_per_sample,
)


def _terms(generator: torch.Generator) -> list[SequenceTerm]:
    # Two uses of a grouped map (G = 2, a = 3, b = 5) over 2 and 4 positions, K = 2 seeds, B = 3.
    terms = []
    for positions in (2, 4):
        inputs = torch.randn(3, 2, 3, positions, generator=generator, dtype=torch.float64)
        grads = torch.randn(2, 3, 2, 5, positions, generator=generator, dtype=torch.float64)
        terms.append(SequenceTerm(inputs, grads))
    return terms


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("form", ["ghost", "per_sample"])
def test_weight_gramian_matches_rows(
    batched: bool, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-sample form materialises a block of output features at a time (here blocks of
    1 or 2 of the 5 features, the inputs being small): the sum of the blocks' Grams is exact."""
    terms = _terms(torch.Generator().manual_seed(0))
    rows = weight_per_sample(terms, batched)
    flat = rows.reshape(rows.shape[0], -1)
    expected = flat @ flat.T
    ghost = form == "ghost"
    monkeypatch.setattr(_ghost, "ghost_cost", lambda terms, batched: 0 if ghost else 1)
    monkeypatch.setattr(_ghost, "per_sample_cost", lambda terms, batched: 1 if ghost else 0)
    torch.testing.assert_close(weight_gramian(terms, batched), expected)
    torch.testing.assert_close(ghost_gramian(terms, batched), expected)


def test_per_sample_blocks_are_bounded_by_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    terms = _terms(torch.Generator().manual_seed(1))
    monkeypatch.setattr(_ghost, "ghost_cost", lambda terms, batched: 1)
    monkeypatch.setattr(_ghost, "per_sample_cost", lambda terms, batched: 0)
    widths: list[int] = []
    original = _ghost.weight_per_sample

    def spy(block_terms: list[SequenceTerm], batched: bool) -> torch.Tensor:
        widths.append(block_terms[0].grads.shape[3])
        rows = original(block_terms, batched)
        assert rows.numel() <= max(term.inputs.numel() for term in terms)
        return rows

    monkeypatch.setattr(_ghost, "weight_per_sample", spy)
    weight_gramian(terms, True)
    # Rows per feature: R·G·a = 6·2·3 = 36; largest input 3·2·3·4 = 72: blocks of 2 features.
    assert widths == [2, 2, 1]
