from __future__ import annotations

from typing import Any

import pytest
import torch
from _rule_reference import Use, assert_rule_matches, record_calls, reference_rows
from torch import nn

import torchjd.autogram._rules._embedding as embedding_module
from torchjd.autogram._rules import find_rule
from torchjd.autogram._rules._embedding import (
    _ELEMENTS_PER_CHUNK,
    EmbeddingRule,
    _entry_pairs_gramian,
    _ghost_cost,
    _ghost_gramian,
    _lookups,
    _pairs_cost,
    _pairs_gramian,
    _vocabulary_cost,
    _vocabulary_gramian,
)

CONFIGS: list[dict[str, Any]] = [
    {"num_embeddings": 7, "embedding_dim": 3},
    {"num_embeddings": 50, "embedding_dim": 4, "padding_idx": 2},
    {"num_embeddings": 6, "embedding_dim": 2, "padding_idx": -1, "scale_grad_by_freq": True},
    {"num_embeddings": 9, "embedding_dim": 3, "max_norm": 1.0},
    {"num_embeddings": 40, "embedding_dim": 5, "sparse": True, "padding_idx": 0},
]


def _ids(
    shape: tuple[int, ...], vocabulary: int, generator: torch.Generator, padding: int | None
) -> torch.Tensor:
    # A small range of ids makes repeated tokens (within and across samples) likely.
    ids = torch.randint(0, min(vocabulary, 6), shape, generator=generator)
    if padding is not None:
        ids.view(-1)[::3] = padding
    return ids


@pytest.mark.parametrize("index", range(len(CONFIGS)))
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 4), (3,), (1, 2, 3)])
def test_matches_reference(
    index: int, batched: bool, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(index)
    module = nn.Embedding(**CONFIGS[index]).to(dtype)
    generator = torch.Generator().manual_seed(index)
    padding = module.padding_idx
    seeds = 3 if len(shape) == 2 else 1
    uses = [
        Use((_ids(shape, module.num_embeddings, generator, padding),)),
        Use((_ids(shape, module.num_embeddings, generator, padding),)),
    ]
    calls = record_calls(module, uses, seeds, generator)
    rule = find_rule(module)
    assert isinstance(rule, EmbeddingRule)
    # Token counts of `scale_grad_by_freq` are over the whole call, as in autograd's backward.
    per_sample = not module.scale_grad_by_freq
    expected = reference_rows(module, calls, ["weight"], batched, rerun_per_sample=per_sample)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-12)
    assert_rule_matches(rule, module, calls, ["weight"], batched, expected, generator, rtol, atol)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("vocabulary", [5, 1000])
@pytest.mark.parametrize("padding", [None, 1])
def test_all_gramian_forms_agree(batched: bool, vocabulary: int, padding: int | None) -> None:
    """The ghost, pair and vocabulary forms are all exact."""
    torch.manual_seed(0)
    module = nn.Embedding(vocabulary, 3, padding_idx=padding, scale_grad_by_freq=True).double()
    generator = torch.Generator().manual_seed(1)
    uses = [
        Use((torch.randint(0, 8, (4, 6), generator=generator) % vocabulary,)),
        Use((torch.randint(0, 8, (4, 2), generator=generator) % vocabulary,)),
    ]
    calls = record_calls(module, uses, 2, generator)
    expected = reference_rows(module, calls, ["weight"], batched, rerun_per_sample=False)
    flat = expected["weight"].reshape(len(expected["weight"]), -1)
    lookups = _lookups(module, calls, batched)
    torch.testing.assert_close(_ghost_gramian(lookups), flat @ flat.T)
    torch.testing.assert_close(_pairs_gramian(module, lookups), flat @ flat.T)
    torch.testing.assert_close(_vocabulary_gramian(module, lookups), flat @ flat.T)


def test_cost_estimate_prefers_ghost_for_short_sequences_only() -> None:
    module = nn.Embedding(10_000, 16)
    generator = torch.Generator().manual_seed(2)
    short = record_calls(module, [Use((torch.randint(0, 10_000, (32, 2)),))], 1, generator)
    long = record_calls(module, [Use((torch.randint(0, 10_000, (32, 64)),))], 1, generator)
    short_lookups = _lookups(module, short, True)
    long_lookups = _lookups(module, long, True)
    assert _ghost_cost(short_lookups) < _pairs_cost(short_lookups)
    assert _ghost_cost(long_lookups) > _pairs_cost(long_lookups)
    assert _vocabulary_cost(module, long_lookups) > _pairs_cost(long_lookups)


def test_sparse_embedding_gives_sparse_weighted_gradient() -> None:
    module = nn.Embedding(10, 2, sparse=True)
    generator = torch.Generator().manual_seed(3)
    calls = record_calls(module, [Use((torch.tensor([[1, 2], [2, 3]]),))], 1, generator)
    weighted = EmbeddingRule().weighted_gradients(
        module, calls, ["weight"], True, torch.tensor([1.0, 2.0])
    )
    assert weighted["weight"].is_sparse


def test_padding_rows_get_no_gradient() -> None:
    module = nn.Embedding(5, 2, padding_idx=0)
    generator = torch.Generator().manual_seed(4)
    calls = record_calls(module, [Use((torch.tensor([[0, 1], [0, 0]]),))], 2, generator)
    rows = EmbeddingRule().per_row_gradients(module, calls, ["weight"], True)["weight"]
    assert rows.shape == (4, 5, 2)
    assert torch.all(rows[:, 0] == 0)
    assert torch.all(rows[1::2] == 0)  # the second sample only has padding tokens


def test_wrong_weights_shape_is_refused() -> None:
    module = nn.Embedding(5, 2)
    generator = torch.Generator().manual_seed(5)
    calls = record_calls(module, [Use((torch.tensor([[0, 1], [2, 3]]),))], 1, generator)
    with pytest.raises(ValueError, match="one weight per Jacobian row"):
        EmbeddingRule().weighted_gradients(module, calls, ["weight"], True, torch.ones(3))


def test_pair_form_with_frequent_and_rare_tokens() -> None:
    """Tokens in many samples go through the dense part, the others through pairs."""
    module = nn.Embedding(60, 4, padding_idx=0).double()
    generator = torch.Generator().manual_seed(6)
    frequent = torch.randint(1, 4, (12, 3), generator=generator)  # in most samples
    rare = torch.randint(4, 60, (12, 4), generator=generator)  # in one or two samples
    ids = torch.cat([frequent, rare, torch.zeros(12, 1, dtype=torch.long)], dim=1)
    calls = record_calls(module, [Use((ids,))], 2, generator)
    lookups = _lookups(module, calls, True)
    torch.testing.assert_close(
        _entry_pairs_gramian(module, lookups), _vocabulary_gramian(module, lookups)
    )


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("padding", [None, 2])
def test_pair_forms_match_reference(batched: bool, seeds: int, padding: int | None) -> None:
    """The token-pair form (with tokens found once, repeated within and across samples, over two
    calls of different lengths) and the entry-pair form against the reference rows."""
    torch.manual_seed(7)
    module = nn.Embedding(40, 3, padding_idx=padding).double()
    generator = torch.Generator().manual_seed(7)
    uses = [
        Use((torch.randint(0, 40, (5, 6), generator=generator),)),
        Use((torch.randint(0, 40, (5, 2), generator=generator),)),
    ]
    calls = record_calls(module, uses, seeds, generator)
    expected = reference_rows(module, calls, ["weight"], batched)
    flat = expected["weight"].reshape(len(expected["weight"]), -1)
    lookups = _lookups(module, calls, batched)
    torch.testing.assert_close(_pairs_gramian(module, lookups), flat @ flat.T)
    torch.testing.assert_close(_entry_pairs_gramian(module, lookups), flat @ flat.T)


def test_pair_form_falls_back_to_entries_when_ids_repeat_a_lot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = nn.Embedding(8, 2).double()
    generator = torch.Generator().manual_seed(8)
    calls = record_calls(
        module, [Use((torch.randint(0, 2, (6, 5), generator=generator),))], 2, generator
    )
    lookups = _lookups(module, calls, True)
    expected = _vocabulary_gramian(module, lookups)
    calls_to_entries: list[int] = []

    def counting_entries(*args: Any) -> torch.Tensor:
        calls_to_entries.append(1)
        return _entry_pairs_gramian(*args)

    monkeypatch.setattr(embedding_module, "_entry_pairs_gramian", counting_entries)
    monkeypatch.setattr(embedding_module, "_ELEMENTS_PER_CHUNK", 16)
    torch.testing.assert_close(embedding_module._pairs_gramian(module, lookups), expected)
    assert calls_to_entries == [1]
    monkeypatch.setattr(embedding_module, "_ELEMENTS_PER_CHUNK", _ELEMENTS_PER_CHUNK)
    torch.testing.assert_close(embedding_module._pairs_gramian(module, lookups), expected)
    assert calls_to_entries == [1]


@pytest.mark.parametrize("counts_first", [True, False])
@pytest.mark.parametrize("seeds", [1, 2])
def test_pair_form_reads_counts_before_or_after_finding_the_tokens(
    monkeypatch: pytest.MonkeyPatch, counts_first: bool, seeds: int
) -> None:
    """The accelerator order (both counts read first, one synchronisation) and the CPU order
    (positions first) give the same exact Gramian, with padding, groups of 1 to many tokens,
    and a batch without any repeated id; both fall back to the entry form past the chunk size."""
    monkeypatch.setattr(embedding_module, "_counts_before_positions", lambda device: counts_first)
    module = nn.Embedding(30, 3, padding_idx=0).double()
    generator = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 30, (6, 7), generator=generator)
    ids[0, :4] = 5  # a group of at least 4 tokens, in one sample
    unique = torch.randperm(29, generator=generator)[:12].add(1).view(4, 3)
    for tokens in (ids, unique):
        calls = record_calls(module, [Use((tokens,))], seeds, generator)
        lookups = _lookups(module, calls, True)
        expected = _vocabulary_gramian(module, lookups)
        torch.testing.assert_close(embedding_module._pairs_gramian(module, lookups), expected)
    calls = record_calls(module, [Use((ids,))], seeds, generator)
    lookups = _lookups(module, calls, True)
    expected = _vocabulary_gramian(module, lookups)
    entry_calls: list[int] = []

    def counting_entries(*args: Any) -> torch.Tensor:
        entry_calls.append(1)
        return _entry_pairs_gramian(*args)

    monkeypatch.setattr(embedding_module, "_entry_pairs_gramian", counting_entries)
    monkeypatch.setattr(embedding_module, "_ELEMENTS_PER_CHUNK", 8)
    torch.testing.assert_close(embedding_module._pairs_gramian(module, lookups), expected)
    assert entry_calls == [1]


def test_fused_step_reuses_the_lookups_and_matches_the_rows() -> None:
    """``gramian_then_weighted_gradients``: the Gramian and, later, the weighted gradient (dense
    and sparse, with token weights from padding and, dense only as in autograd, frequencies)
    against the reference rows."""
    for sparse in (False, True):
        module = nn.Embedding(12, 3, padding_idx=1, scale_grad_by_freq=not sparse, sparse=sparse)
        module = module.double()
        generator = torch.Generator().manual_seed(10)
        uses = [Use((torch.randint(0, 12, (4, 5), generator=generator),))]
        calls = record_calls(module, uses, 2, generator)
        expected = reference_rows(module, calls, ["weight"], True, rerun_per_sample=False)
        rows = expected["weight"].reshape(8, -1)
        gramian, weighted = EmbeddingRule().gramian_then_weighted_gradients(
            module, calls, ["weight"], True
        )
        torch.testing.assert_close(gramian, rows @ rows.T)
        weights = torch.randn(8, generator=generator, dtype=torch.float64)
        gradient = weighted(weights)["weight"]
        assert gradient.is_sparse == sparse
        actual = gradient.to_dense() if sparse else gradient
        torch.testing.assert_close(actual, torch.tensordot(weights, expected["weight"], dims=1))
