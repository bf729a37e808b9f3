"""The generic fallback rule against plain autograd."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _autogram_rows import gram, record, reference_rows
from torch import Tensor, nn

from torchjd.autogram._rules import Call
from torchjd.autogram._rules import _fallback as fallback_module
from torchjd.autogram._rules._fallback import FallbackRule

RULE = FallbackRule()


class TwoOutputs(nn.Module):
    """Dropout with direct parameters, and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = F.dropout(x @ self.weight.T, p=0.3, training=True)
        return hidden * self.scale, torch.tanh(hidden).sum(dim=-1)


class _NumpyTanh(torch.autograd.Function):
    """A backward that vmap cannot batch (it goes through numpy)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (output,) = ctx.saved_tensors
        return torch.from_numpy(grad.numpy() * (1.0 - output.numpy() ** 2))


class NumpyModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return _NumpyTanh.apply(x @ self.weight.T)


PARAMS = ["weight", "scale"]


def _calls(num_seeds: int, shapes: list[tuple[int, ...]]) -> tuple[TwoOutputs, list[Call]]:
    module = TwoOutputs()
    return module, [record(module, torch.randn(*shape), num_seeds=num_seeds) for shape in shapes]


@pytest.mark.parametrize("num_seeds", [1, 3])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("shapes", [[(4, 4)], [(3, 2, 4), (3, 4)]])
def test_rows_gramian_and_weighted_gradients(
    num_seeds: int, batched: bool, shapes: list[tuple[int, ...]]
) -> None:
    torch.manual_seed(0)
    module, calls = _calls(num_seeds, shapes)
    calls[0].grad_outputs[1] = None  # an output that does not reach the differentiated tensor
    params = [module.weight, module.scale]
    expected = reference_rows(calls, params, batched)
    rows = RULE.per_row_gradients(module, calls, PARAMS, batched)
    for name, row in zip(PARAMS, expected):
        torch.testing.assert_close(rows[name], row)
    gramian = RULE.gramian(module, calls, PARAMS, batched)
    torch.testing.assert_close(gramian, gram(expected))
    weights = torch.randn(expected[0].shape[0])
    weighted = RULE.weighted_gradients(module, calls, PARAMS, batched, weights)
    for name, row in zip(PARAMS, expected):
        torch.testing.assert_close(weighted[name], torch.tensordot(weights, row, dims=1))


def test_chunks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module, calls = _calls(2, [(5, 4)])
    expected = RULE.per_row_gradients(module, calls, PARAMS, True)
    monkeypatch.setattr(fallback_module, "_ELEMENTS_PER_CHUNK", 1)
    chunked = RULE.per_row_gradients(module, calls, PARAMS, True)
    for name in PARAMS:
        torch.testing.assert_close(chunked[name], expected[name])


def test_rows_one_at_a_time_when_vmap_fails() -> None:
    torch.manual_seed(0)
    module = NumpyModule()
    call = record(module, torch.randn(4, 4), num_seeds=2)
    with pytest.raises(RuntimeError):  # the batched path really fails for this graph
        torch.autograd.grad(
            call.output_edges,  # type: ignore[arg-type]
            [module.weight],
            grad_outputs=[torch.randn(2, 4, 3)],
            retain_graph=True,
            is_grads_batched=True,
        )
    expected = reference_rows([call], [module.weight], True)
    rows = RULE.per_row_gradients(module, [call], ["weight"], True)
    torch.testing.assert_close(rows["weight"], expected[0])


def test_outputs_without_edges() -> None:
    torch.manual_seed(0)
    module, calls = _calls(1, [(4, 4)])
    call = calls[0]
    plain = Call(call.args, call.kwargs, call.outputs, call.grad_outputs)
    expected = reference_rows([plain], [module.weight, module.scale], True)
    rows = RULE.per_row_gradients(module, [plain], PARAMS, True)
    torch.testing.assert_close(rows["weight"], expected[0])


def test_bad_arguments() -> None:
    module, calls = _calls(1, [(4, 4)])
    with pytest.raises(ValueError, match="params"):
        RULE.gramian(module, calls, [], True)
    for call in calls:
        call.grad_outputs = [None, None]
    with pytest.raises(ValueError, match="at least one call"):
        RULE.per_row_gradients(module, calls, PARAMS, True)
    module, calls = _calls(1, [(4, 4)])
    calls[0].grad_outputs[1] = torch.randn(1, 5)  # batch sizes disagree
    with pytest.raises(ValueError, match="dim 0"):
        RULE.per_row_gradients(module, calls, PARAMS, True)
