"""Gramian rule of ``Conv1d``, ``Conv2d`` and ``Conv3d``.

A convolution is a grouped linear map applied at every output position to the input patch that
position sees: unfolding the input (im2col) turns it into a :class:`~._ghost.SequenceTerm` with
``T`` = the number of output positions, so the ghost and per-sample forms of :mod:`._ghost` apply.
Padding (numbers, ``'same'``, ``'valid'``, and every ``padding_mode``), stride, dilation and groups
are reproduced exactly by padding the input the way the module does before unfolding.

Weighted gradients and summed-mode rows never unfold: they are ordinary convolution
weight-gradients (``convolution_backward``), one per seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import EllipsisType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Call, GramianRule
from ._common import (
    check_params,
    check_weights,
    common_batch_size,
    first_argument,
    gram,
    leading_axes,
    seed_count,
    weighted_calls,
)
from ._ghost import SequenceTerm, bias_per_sample, weight_gramian, weight_per_sample
from ._registry import register_rule

_ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


@dataclass(eq=False)
class _ConvUse:
    """One call: the input as the convolution sees it, and its output gradients."""

    inputs: Tensor  # [B, C_in, *S], padded already when `padding` is all zeros
    padding: tuple[int, ...]  # symmetric padding still to apply (zeros)
    grads: Tensor  # [K, B, C_out, *O]


def _explicit_padding(module: _ConvNd) -> list[tuple[int, int]]:
    """The (before, after) padding of each spatial dim, as the module applies it."""
    dims = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * dims
        pads = []
        for dilation, kernel in zip(module.dilation, module.kernel_size):
            total = dilation * (kernel - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(int(p), int(p)) for p in module.padding]


def _use_of(module: _ConvNd, call: Call, batched: bool) -> _ConvUse | None:
    grad = call.grad_outputs[0] if call.grad_outputs else None
    if grad is None:
        return None
    inputs = first_argument(module, call)
    dims = len(module.kernel_size)
    if inputs.ndim == dims + 1:
        if batched:
            raise ValueError(
                f"Expected the input of {type(module).__name__} to be batched on dim 0 when "
                f"`batch_dim` is not None; found an unbatched input of shape {tuple(inputs.shape)}."
            )
        inputs, grad = inputs.unsqueeze(0), grad.unsqueeze(1)
    pads = _explicit_padding(module)
    symmetric = all(before == after for before, after in pads)
    if module.padding_mode == "zeros" and symmetric:
        return _ConvUse(inputs, tuple(before for before, _ in pads), grad)
    flat_pads = [value for before_after in reversed(pads) for value in before_after]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    # The module pads the same way before convolving, so the result is its exact input.
    padded = F.pad(inputs, flat_pads, mode=mode)
    return _ConvUse(padded, (0,) * dims, grad)


def _unfold(module: _ConvNd, use: _ConvUse) -> Tensor:
    """The input patches ``[B, G, C_in/G · prod(kernel), T]`` (im2col).

    Strided views (``Tensor.unfold`` per spatial dim) and a single copy at the end: several times
    faster than ``F.unfold`` on CPU, and the same for every number of spatial dims.
    """
    inputs = use.inputs
    batch, channels = inputs.shape[:2]
    dims = len(module.kernel_size)
    if any(use.padding):
        inputs = F.pad(inputs, [p for pad in reversed(use.padding) for p in (pad, pad)])
    windows = inputs
    for axis, (kernel, dilation, stride) in enumerate(
        zip(module.kernel_size, module.dilation, module.stride)
    ):
        windows = windows.unfold(2 + axis, dilation * (kernel - 1) + 1, stride)
    # windows: [B, C, *O, *span]; keep every `dilation`-th element of each span.
    strides = tuple(slice(None, None, d) for d in module.dilation)
    keep: tuple[EllipsisType | slice, ...] = (Ellipsis, *strides)
    windows = windows[keep]
    order = [0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims)]
    patches = windows.permute(order)  # [B, C, *kernel, *O]
    groups = module.groups
    return patches.reshape(batch, groups, channels // groups * math.prod(module.kernel_size), -1)


def _grouped_grads(module: _ConvNd, use: _ConvUse) -> Tensor:
    """The output gradients as ``[K, B, G, C_out/G, T]``."""
    k, batch = use.grads.shape[:2]
    return use.grads.reshape(k, batch, module.groups, module.out_channels // module.groups, -1)


def _term(module: _ConvNd, use: _ConvUse) -> SequenceTerm:
    return SequenceTerm(_unfold(module, use), _grouped_grads(module, use))


def _summed_weight_rows(module: _ConvNd, uses: Sequence[_ConvUse]) -> Tensor:
    """Rows ``[K, *weight.shape]`` of summed mode: one convolution weight-gradient per seed."""
    weight = module.weight
    dims = len(module.kernel_size)
    seeds = uses[0].grads.shape[0]
    rows = []
    for seed in range(seeds):
        row: Tensor | None = None
        for use in uses:
            _, grad_weight, _ = torch.ops.aten.convolution_backward(
                use.grads[seed],
                use.inputs,
                weight,
                None,
                list(module.stride),
                list(use.padding),
                list(module.dilation),
                False,
                [0] * dims,
                module.groups,
                [False, True, False],
            )
            row = grad_weight if row is None else row + grad_weight
        assert row is not None
        rows.append(row)
    return torch.stack(rows)


class ConvRule(GramianRule):
    """Rows, Gramian and weighted gradients of a convolution's ``weight`` and ``bias``."""

    def needs_graph(self, module: nn.Module) -> bool:
        return False

    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        conv = _as_conv(module)
        check_params(params, ["weight", "bias"], module)
        uses = _uses(conv, calls, batched)
        result: dict[str, Tensor] = {}
        if "weight" in params:
            if batched:
                rows = weight_per_sample([_term(conv, use) for use in uses], batched)
                result["weight"] = rows.reshape(rows.shape[0], *conv.weight.shape)
            else:
                result["weight"] = _summed_weight_rows(conv, uses)
        if "bias" in params:
            bias_rows = bias_per_sample([_grouped_grads(conv, use) for use in uses], batched)
            result["bias"] = bias_rows.reshape(bias_rows.shape[0], -1)
        return {name: result[name] for name in params}

    def gramian(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> Tensor:
        conv = _as_conv(module)
        check_params(params, ["weight", "bias"], module)
        uses = _uses(conv, calls, batched)
        parts = []
        if "weight" in params:
            if batched:
                parts.append(weight_gramian([_term(conv, use) for use in uses], batched))
            else:
                parts.append(gram([_summed_weight_rows(conv, uses)]))
        if "bias" in params:
            bias_rows = bias_per_sample([_grouped_grads(conv, use) for use in uses], batched)
            parts.append(gram([bias_rows]))
        return sum(parts[1:], parts[0])

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        conv = _as_conv(module)
        uses = _uses(conv, calls, batched)
        check_weights(weights, uses[0].grads.shape[0], uses[0].grads.shape[1], batched)
        combined = weighted_calls(calls, weights, batched, leading_axes)
        rows = self.per_row_gradients(module, combined, params, batched=False)
        return {name: row[0] for name, row in rows.items()}


def _as_conv(module: nn.Module) -> _ConvNd:
    if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        raise TypeError(f"Expected a Conv1d, Conv2d or Conv3d; found {type(module).__name__}.")
    return module


def _uses(module: _ConvNd, calls: Sequence[Call], batched: bool) -> list[_ConvUse]:
    seeds = seed_count(calls)
    uses = [use for call in calls if (use := _use_of(module, call, batched)) is not None]
    if batched:
        common_batch_size([use.grads.shape[1] for use in uses], module)
    assert all(use.grads.shape[0] == seeds for use in uses)
    return uses


_RULE = ConvRule()
for _module_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_module_type, _RULE)
