"""Gramian rule of ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` (any depth, bidirectional or not).

Rows are vector-Jacobian products on the graph the real forward call recorded (see
:mod:`._fallback`): exact, and no re-run of the recurrence. The samples of the output are on dim 0
(``batch_first=True``, required when ``batch_dim`` is set) and those of the final hidden (and
cell) states on dim 1, as PyTorch lays them out.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ._base import Call, GramianRule
from ._common import check_params, first_argument
from ._fallback import recorded_rows, recorded_weighted_gradients
from ._registry import register_rule


def _sample_axes(call: Call) -> list[int]:
    """The output's samples are on dim 0 (``batch_first``), the hidden states' on dim 1."""
    return [0] + [1] * (len(call.outputs) - 1)


class RNNRule(GramianRule):
    """Rows and weighted gradients of a recurrent layer's weights and biases."""

    def check(self, module: nn.Module, batched: bool) -> None:
        if batched and isinstance(module, nn.RNNBase) and not module.batch_first:
            raise ValueError(
                f"Found a module of type {type(module).__name__} with `batch_first=False`, whose "
                "input and output have their samples on dim 1, which is incompatible with "
                "`batch_dim` not None. Create it with `batch_first=True` or use `batch_dim=None`."
            )

    def sample_axes(self, module: nn.Module, call: Call) -> Sequence[int]:
        return _sample_axes(call)

    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        self._check_calls(module, calls, params, batched)
        return recorded_rows(module, calls, params, batched, _sample_axes)

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        self._check_calls(module, calls, params, batched)
        return recorded_weighted_gradients(module, calls, params, batched, weights, _sample_axes)

    def _check_calls(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> None:
        self.check(module, batched)
        check_params(params, list(dict(module.named_parameters(recurse=False))), module)
        if not batched:
            return
        for call in calls:
            inputs = first_argument(module, call)
            if isinstance(inputs, PackedSequence):
                raise ValueError(
                    f"Found a call of {type(module).__name__} on a PackedSequence, whose samples "
                    "are interleaved, which is incompatible with `batch_dim` not None. Pass a "
                    "padded batch-first tensor or use `batch_dim=None`."
                )
            if isinstance(inputs, Tensor) and inputs.ndim != 3:
                raise ValueError(
                    f"Expected the input of {type(module).__name__} to be batched on dim 0 when "
                    f"`batch_dim` is not None; found an input of shape {tuple(inputs.shape)}."
                )


register_rule(nn.RNNBase, RNNRule())
