from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _rule_reference import Use, assert_rule_matches, record_calls, reference_rows, trainable
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from torchjd.autogram._rules import Call, find_rule
from torchjd.autogram._rules._rnn import RNNRule

CONFIGS: list[Callable[[], nn.RNNBase]] = [
    lambda: nn.RNN(3, 4, batch_first=True),
    lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="relu", bias=False, batch_first=True,
                   bidirectional=True),
    lambda: nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True),
    lambda: nn.LSTM(3, 4, proj_size=2, batch_first=True),
    lambda: nn.GRU(3, 4, num_layers=2, batch_first=True),
    lambda: nn.GRU(3, 3, bidirectional=True, batch_first=True, bias=False),
]  # fmt: skip


def _slice_sample(call: Call, sample: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One sample of an RNN call: dim 0 of the input, dim 1 of the initial states."""
    inputs = call.args[0][sample : sample + 1]
    if len(call.args) == 1:
        return (inputs,), {}
    states = call.args[1]
    if isinstance(states, tuple):
        return (inputs, tuple(s[:, sample : sample + 1] for s in states)), {}
    return (inputs, states[:, sample : sample + 1]), {}


def _initial_states(module: nn.RNNBase, batch: int, generator: torch.Generator) -> Any:
    layers = module.num_layers * (2 if module.bidirectional else 1)
    hidden = module.proj_size or module.hidden_size
    h0 = torch.randn(layers, batch, hidden, generator=generator, dtype=torch.float64)
    if isinstance(module, nn.LSTM):
        c0 = torch.randn(layers, batch, module.hidden_size, generator=generator)
        return (h0, c0.double())
    return h0


def _build(index: int) -> nn.RNNBase:
    torch.manual_seed(index)
    return CONFIGS[index]().double()


@pytest.mark.parametrize("index", range(len(CONFIGS)))
@pytest.mark.parametrize("batched", [True, False])
def test_matches_reference(index: int, batched: bool) -> None:
    module = _build(index)
    generator = torch.Generator().manual_seed(index)
    batch, seeds = (3, 3) if index % 2 else (5, 1)
    length = 4
    inputs = [torch.randn(batch, length, 3, generator=generator, dtype=torch.float64)]
    inputs.append(torch.randn(batch, length - 1, 3, generator=generator, dtype=torch.float64))
    uses = [
        Use((inputs[0],)),
        Use((inputs[1], _initial_states(module, batch, generator)), drop_grads=(1,)),
    ]
    calls = record_calls(module, uses, seeds, generator)
    rule = find_rule(module)
    assert isinstance(rule, RNNRule)
    params = trainable(module, rule)
    axes = [0, 1, 1] if isinstance(module, nn.LSTM) else [0, 1]
    expected = reference_rows(module, calls, params, batched, _slice_sample, axes)
    assert_rule_matches(rule, module, calls, params, batched, expected, generator, 1e-9, 1e-10)


def test_float32_and_batch_of_one() -> None:
    torch.manual_seed(0)
    module = nn.LSTM(2, 3, batch_first=True)
    generator = torch.Generator().manual_seed(1)
    calls = record_calls(module, [Use((torch.randn(1, 5, 2, generator=generator),))], 3, generator)
    params = trainable(module, RNNRule())
    expected = reference_rows(module, calls, params, True, _slice_sample, [0, 1, 1])
    assert_rule_matches(RNNRule(), module, calls, params, True, expected, generator, 1e-4, 1e-5)


@pytest.mark.parametrize("unbatched", [True, False])
def test_batch_first_false_and_unbatched_in_summed_mode(unbatched: bool) -> None:
    torch.manual_seed(0)
    module = nn.GRU(2, 3, num_layers=2).double()
    generator = torch.Generator().manual_seed(2)
    shape = (4, 2) if unbatched else (4, 3, 2)  # [T, (B,) H_in]
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    calls = record_calls(module, [Use((inputs,))], 2, generator)
    rule = RNNRule()
    params = trainable(module, rule)
    expected = reference_rows(module, calls, params, False)
    assert_rule_matches(rule, module, calls, params, False, expected, generator, 1e-9, 1e-10)
    with pytest.raises(ValueError, match="batch_first=True"):
        rule.check(module, batched=True)
    with pytest.raises(ValueError, match="batch_first=True"):
        rule.gramian(module, calls, params, batched=True)


def test_packed_sequence_summed_mode_only() -> None:
    torch.manual_seed(0)
    module = nn.LSTM(2, 3, batch_first=True).double()
    generator = torch.Generator().manual_seed(3)
    padded = torch.randn(3, 4, 2, generator=generator, dtype=torch.float64)
    packed = pack_padded_sequence(padded, torch.tensor([4, 2, 3]), batch_first=True,
                                  enforce_sorted=False)  # fmt: skip
    calls = record_calls(module, [Use((packed,))], 2, generator)
    rule = RNNRule()
    params = trainable(module, rule)
    expected = reference_rows(module, calls, params, False)
    assert_rule_matches(rule, module, calls, params, False, expected, generator, 1e-9, 1e-10)
    with pytest.raises(ValueError, match="PackedSequence"):
        rule.per_row_gradients(module, calls, params, batched=True)


def test_rows_of_a_frozen_subset() -> None:
    module = _build(2)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_("l1" in name)
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    calls = record_calls(module, [Use((inputs,))], 2, generator)
    rule = RNNRule()
    params = trainable(module, rule)
    assert params and all("l1" in name for name in params)
    expected = reference_rows(module, calls, params, True, _slice_sample, [0, 1, 1])
    assert_rule_matches(rule, module, calls, params, True, expected, generator, 1e-9, 1e-10)
    rows: dict[str, Tensor] = rule.per_row_gradients(module, calls, params, True)
    assert all(row.shape[0] == 4 for row in rows.values())


@pytest.mark.parametrize("module_type", [nn.RNN, nn.LSTM, nn.GRU])
def test_registered(module_type: type[nn.RNNBase]) -> None:
    assert isinstance(find_rule(module_type(2, 2)), RNNRule)
