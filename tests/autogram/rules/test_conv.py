from __future__ import annotations

from typing import Any

import pytest
import torch
from _rule_reference import Use, assert_rule_matches, record_calls, reference_rows, trainable
from torch import Tensor, nn

from torchjd.autogram._rules import _conv, find_rule
from torchjd.autogram._rules._conv import (
    ConvRule,
    _grouped_conv_rows,
    _term,
    _unfolded_rows,
    _uses,
)
from torchjd.autogram._rules._ghost import (
    SequenceTerm,
    ghost_cost,
    ghost_gramian,
    per_sample_cost,
    weight_per_sample,
)

CONFIGS: list[tuple[type[nn.Module], dict[str, Any], tuple[int, ...]]] = [
    (nn.Conv1d, {"in_channels": 2, "out_channels": 3, "kernel_size": 3}, (7,)),
    (nn.Conv1d, {"in_channels": 4, "out_channels": 6, "kernel_size": 2, "stride": 2,
                 "padding": 1, "dilation": 2, "groups": 2}, (9,)),
    (nn.Conv1d, {"in_channels": 2, "out_channels": 2, "kernel_size": 4, "padding": "same",
                 "padding_mode": "circular"}, (6,)),
    (nn.Conv2d, {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "padding": 1}, (5, 4)),
    (nn.Conv2d, {"in_channels": 4, "out_channels": 4, "kernel_size": (2, 3), "stride": (2, 1),
                 "dilation": (1, 2), "groups": 4, "bias": False}, (6, 7)),
    (nn.Conv2d, {"in_channels": 3, "out_channels": 2, "kernel_size": 2, "padding": "same",
                 "padding_mode": "reflect"}, (4, 5)),
    (nn.Conv2d, {"in_channels": 3, "out_channels": 2, "kernel_size": 4, "padding": "same"}, (5, 5)),
    (nn.Conv2d, {"in_channels": 2, "out_channels": 4, "kernel_size": 3, "padding": 2,
                 "padding_mode": "replicate", "groups": 2}, (4, 4)),
    (nn.Conv3d, {"in_channels": 2, "out_channels": 3, "kernel_size": 2}, (3, 4, 3)),
    (nn.Conv3d, {"in_channels": 2, "out_channels": 2, "kernel_size": (2, 3, 2), "stride": 2,
                 "padding": (1, 0, 1), "dilation": (1, 1, 2), "groups": 2}, (4, 5, 5)),
    # Few output positions and wide patches: the cost estimate picks the ghost form.
    (nn.Conv2d, {"in_channels": 6, "out_channels": 6, "kernel_size": 3}, (3, 4)),
]  # fmt: skip


def _build(index: int, dtype: torch.dtype) -> tuple[nn.Module, tuple[int, ...]]:
    module_type, kwargs, spatial = CONFIGS[index]
    torch.manual_seed(index)
    return module_type(**kwargs).to(dtype), spatial


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-4, 1e-5) if dtype == torch.float32 else (1e-10, 1e-11)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("index", range(len(CONFIGS)))
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(index: int, batched: bool, dtype: torch.dtype) -> None:
    module, spatial = _build(index, dtype)
    generator = torch.Generator().manual_seed(index)
    batch, seeds = (3, 1) if index % 2 else (5, 3)
    channels = module.in_channels
    uses = [Use((torch.randn(batch, channels, *spatial, generator=generator, dtype=dtype),))]
    calls = record_calls(module, uses, seeds, generator)
    rule = find_rule(module)
    assert isinstance(rule, ConvRule)
    params = trainable(module, rule)
    expected = reference_rows(module, calls, params, batched)
    rtol, atol = _tolerances(dtype)
    assert_rule_matches(rule, module, calls, params, batched, expected, generator, rtol, atol)


@pytest.mark.parametrize("batched", [True, False])
def test_several_calls_with_different_sizes(batched: bool) -> None:
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1).double()
    generator = torch.Generator().manual_seed(1)
    uses = [
        Use((torch.randn(3, 2, 5, 6, generator=generator, dtype=torch.float64),)),
        Use((torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64),)),
        Use((torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64),), drop_grads=(0,)),
    ]
    calls = record_calls(module, uses, 2, generator)
    params = ["weight", "bias"]
    expected = reference_rows(module, calls, params, batched)
    rule = ConvRule()
    assert_rule_matches(rule, module, calls, params, batched, expected, generator, 1e-10, 1e-11)


def test_frozen_weight_and_batch_of_one() -> None:
    torch.manual_seed(0)
    module = nn.Conv1d(2, 3, kernel_size=2).double()
    module.weight.requires_grad_(False)
    generator = torch.Generator().manual_seed(2)
    uses = [Use((torch.randn(1, 2, 5, generator=generator, dtype=torch.float64),))]
    calls = record_calls(module, uses, 3, generator)
    rule = ConvRule()
    assert trainable(module, rule) == ["bias"]
    expected = reference_rows(module, calls, ["bias"], True)
    assert_rule_matches(rule, module, calls, ["bias"], True, expected, generator, 1e-10, 1e-11)


def test_unbatched_input_in_summed_mode() -> None:
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, kernel_size=2).double()
    generator = torch.Generator().manual_seed(3)
    uses = [Use((torch.randn(2, 4, 4, generator=generator, dtype=torch.float64),))]
    calls = record_calls(module, uses, 2, generator)
    expected = reference_rows(module, calls, ["weight", "bias"], False)
    rule = ConvRule()
    assert_rule_matches(
        rule, module, calls, ["weight", "bias"], False, expected, generator, 1e-10, 1e-11
    )
    with pytest.raises(ValueError, match="unbatched input"):
        rule.gramian(module, calls, ["weight"], batched=True)


@pytest.mark.parametrize("batched", [True, False])
def test_ghost_form_equals_per_sample_form(batched: bool) -> None:
    """Both exact forms agree, whichever the cost estimate would pick."""
    generator = torch.Generator().manual_seed(4)
    shapes = [(2, 3), (2, 5)]  # (groups, positions) of two uses of the same map
    terms = [
        SequenceTerm(
            torch.randn(4, groups, 6, positions, generator=generator, dtype=torch.float64),
            torch.randn(3, 4, groups, 5, positions, generator=generator, dtype=torch.float64),
        )
        for groups, positions in shapes
    ]
    rows = weight_per_sample(terms, batched)
    flat = rows.reshape(rows.shape[0], -1)
    torch.testing.assert_close(ghost_gramian(terms, batched), flat @ flat.T)


def test_few_positions_use_the_ghost_form() -> None:
    module, spatial = _build(len(CONFIGS) - 1, torch.float64)
    generator = torch.Generator().manual_seed(6)
    calls = record_calls(module, [Use((torch.randn(5, 6, *spatial, dtype=torch.float64),))], 1,
                         generator)  # fmt: skip
    uses = _uses(module, calls, batched=True)
    terms = [_term(module, use) for use in uses]
    assert ghost_cost(terms, batched=True) < per_sample_cost(terms, batched=True)


def test_mismatched_batch_sizes_are_refused() -> None:
    module = nn.Conv1d(1, 1, kernel_size=1)
    generator = torch.Generator().manual_seed(5)
    uses = [Use((torch.randn(2, 1, 3),)), Use((torch.randn(3, 1, 3),))]
    calls = record_calls(module, uses, 1, generator)
    with pytest.raises(ValueError, match="same batch size"):
        ConvRule().gramian(module, calls, ["weight"], batched=True)


@pytest.mark.parametrize("module_type", [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LazyConv2d])
def test_registered(module_type: type[nn.Module]) -> None:
    module = module_type(2, 2, 1) if module_type is not nn.LazyConv2d else module_type(2, 1)
    assert isinstance(find_rule(module), ConvRule)
    # Transposed convolutions are another map: not this rule's.
    assert not isinstance(find_rule(nn.ConvTranspose2d(2, 2, 1)), ConvRule)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("index", range(len(CONFIGS)))
@pytest.mark.parametrize("seeds", [1, 3])
def test_grouped_and_chunked_unfolded_rows_agree(
    index: int, seeds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of materialising per-sample rows (and the chunked unfolding) give the same rows."""
    module, spatial = _build(index, torch.float64)
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    generator = torch.Generator().manual_seed(index)
    inputs = torch.randn(4, module.in_channels, *spatial, generator=generator, dtype=torch.float64)
    calls = record_calls(module, [Use((inputs,))], seeds, generator)
    (use,) = _uses(module, calls, batched=True)
    unfolded = _unfolded_rows(module, use)
    torch.testing.assert_close(_grouped_conv_rows(module, use), unfolded)
    monkeypatch.setattr(_conv, "_UNFOLDED_ELEMENTS_PER_CHUNK", 1)  # one sample per chunk
    torch.testing.assert_close(_unfolded_rows(module, use), unfolded)
    expected = reference_rows(module, calls, ["weight"], batched=True)["weight"]
    torch.testing.assert_close(unfolded, expected)


def test_rows_kept_for_the_weighted_gradient_only_when_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Few positions and many channels: the rows outweigh the inputs, the calls are kept instead."""
    module = nn.Conv2d(16, 16, 3).double()
    generator = torch.Generator().manual_seed(0)
    calls = record_calls(module, [Use((torch.randn(2, 16, 5, 5, dtype=torch.float64),))], 1,
                         generator)  # fmt: skip
    monkeypatch.setattr(_conv, "_uses_ghost_form", lambda *_: False)
    params = ["weight", "bias"]
    expected = reference_rows(module, calls, params, batched=True)
    weights = torch.randn(2, generator=generator, dtype=torch.float64)
    calls_seen = []
    original = ConvRule.weighted_gradients

    def spy(self: ConvRule, *args: object, **kwargs: object) -> dict[str, Tensor]:
        calls_seen.append(True)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ConvRule, "weighted_gradients", spy)
    _, weighted = ConvRule().gramian_then_weighted_gradients(module, calls, params, True)
    result = weighted(weights)
    assert calls_seen == [True]
    for name in params:
        torch.testing.assert_close(result[name], torch.tensordot(weights, expected[name], dims=1))
