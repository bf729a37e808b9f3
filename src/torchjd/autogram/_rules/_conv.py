"""Gramian rule of ``Conv1d``, ``Conv2d`` and ``Conv3d``.

A convolution is a grouped linear map applied at every output position to the input patch that
position sees: unfolding the input (im2col) turns it into a :class:`~._ghost.SequenceTerm` with
``T`` = the number of output positions, so the ghost and per-sample forms of :mod:`._ghost` apply.
Padding (numbers, ``'same'``, ``'valid'``, and every ``padding_mode``), stride, dilation and groups
are reproduced exactly by padding the input the way the module does before unfolding.

When the per-sample form is the cheaper one (many output positions), per-sample rows come from a
grouped convolution weight-gradient with one group per sample (no unfolded copy) when each group
has enough input channels for it to be efficient, and otherwise from the unfolded input, a chunk
of samples at a time (bounding the size of the unfolded copy). The fused step reuses those rows
for the weighted gradient (a ``[R] @ [R, p]`` product) when they take no more memory than the
inputs and output gradients they replace.

Other weighted gradients and summed-mode rows never unfold: they are ordinary convolution
weight-gradients (``convolution_backward``), one per seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    gramian_and_weighted_rows,
    leading_axes,
    seed_count,
    weighted_calls,
)
from ._ghost import (
    SequenceTerm,
    bias_per_sample,
    ghost_cost,
    ghost_gramian,
    per_sample_cost,
)
from ._registry import register_rule

_ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d

# Below this many input channels per group (and sample), a grouped convolution's weight-gradient is
# slower than unfolding: its per-group products are too small (measured on CPU, 3 vs 16 channels).
_MIN_CHANNELS_FOR_GROUPED = 8
# Bounds the unfolded copy of one chunk of samples, in elements.
_UNFOLDED_ELEMENTS_PER_CHUNK = 1 << 22


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


def _shape_term(module: _ConvNd, use: _ConvUse) -> SequenceTerm:
    """A term with the shapes of :func:`_term` (on the meta device): costs without unfolding."""
    batch = use.inputs.shape[0]
    grads = _grouped_grads(module, use)
    patch = module.in_channels // module.groups * math.prod(module.kernel_size)
    inputs = torch.empty(batch, module.groups, patch, grads.shape[-1], device="meta")
    return SequenceTerm(inputs, torch.empty(grads.shape, device="meta"))


def _uses_ghost_form(module: _ConvNd, uses: Sequence[_ConvUse]) -> bool:
    terms = [_shape_term(module, use) for use in uses]
    return ghost_cost(terms, True) < per_sample_cost(terms, True)


def _per_sample_weight_rows(module: _ConvNd, uses: Sequence[_ConvUse]) -> Tensor:
    """The batched-mode weight rows ``[K * B, *weight.shape]``, summed over the uses."""
    result: Tensor | None = None
    for use in uses:
        if module.in_channels // module.groups >= _MIN_CHANNELS_FOR_GROUPED:
            part = _grouped_conv_rows(module, use)
        else:
            part = _unfolded_rows(module, use)
        result = part if result is None else result.add_(part)
    assert result is not None
    return result


def _grouped_conv_rows(module: _ConvNd, use: _ConvUse) -> Tensor:
    """Per-sample weight-gradients as one grouped weight-gradient: a group per seed and sample."""
    seeds, batch = use.grads.shape[:2]
    inputs = use.inputs
    if seeds > 1:
        inputs = inputs.unsqueeze(0).expand(seeds, *inputs.shape)
    rows = seeds * batch
    stacked_inputs = inputs.reshape(1, rows * module.in_channels, *use.inputs.shape[2:])
    stacked_grads = use.grads.reshape(1, rows * module.out_channels, *use.grads.shape[3:])
    weight = module.weight
    # Only the shape of the weight is read (no input gradient is asked for).
    stacked_weight = weight.new_empty(rows * weight.shape[0], *weight.shape[1:])
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        stacked_grads.to(dtype=use.inputs.dtype),
        stacked_inputs,
        stacked_weight,
        None,
        list(module.stride),
        list(use.padding),
        list(module.dilation),
        False,
        [0] * len(module.kernel_size),
        rows * module.groups,
        [False, True, False],
    )
    return grad_weight.view(rows, *weight.shape)


def _unfolded_rows(module: _ConvNd, use: _ConvUse) -> Tensor:
    """Per-sample weight-gradients from the unfolded input, a chunk of samples at a time."""
    seeds, batch = use.grads.shape[:2]
    weight = module.weight
    grads = _grouped_grads(module, use)  # [K, B, G, b, T]
    positions = grads.shape[-1]
    patch = module.in_channels // module.groups * math.prod(module.kernel_size)
    chunk = max(1, _UNFOLDED_ELEMENTS_PER_CHUNK // max(1, module.groups * patch * positions))
    if chunk >= batch:
        rows = _per_sample_products(_unfold(module, use), grads)
        return rows.reshape(seeds * batch, *weight.shape)
    rows = grads.new_empty(seeds, batch, module.groups, grads.shape[3], patch)
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        part = _ConvUse(use.inputs[start:stop], use.padding, use.grads[:, start:stop])
        rows[:, start:stop] = _per_sample_products(_unfold(module, part), grads[:, start:stop])
    return rows.reshape(seeds * batch, *weight.shape)


def _per_sample_products(patches: Tensor, grads: Tensor) -> Tensor:
    """``D[k, i, g] X[i, g]ᵀ`` as ``[K, B, G, b, a]``: seeds folded into one batched product."""
    seeds, batch, groups, b, positions = grads.shape
    folded = grads.permute(1, 2, 0, 3, 4).reshape(batch, groups, seeds * b, positions)
    products = folded @ patches.to(dtype=grads.dtype).transpose(-1, -2)
    return products.view(batch, groups, seeds, b, patches.shape[2]).permute(2, 0, 1, 3, 4)


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
                result["weight"] = _per_sample_weight_rows(conv, uses)
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
            if batched and _uses_ghost_form(conv, uses):
                parts.append(ghost_gramian([_term(conv, use) for use in uses], batched))
            elif batched:
                parts.append(gram([_per_sample_weight_rows(conv, uses)]))
            else:
                parts.append(gram([_summed_weight_rows(conv, uses)]))
        if "bias" in params:
            bias_rows = bias_per_sample([_grouped_grads(conv, use) for use in uses], batched)
            parts.append(gram([bias_rows]))
        return sum(parts[1:], parts[0])

    def gramian_then_weighted_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
        conv = _as_conv(module)
        check_params(params, ["weight", "bias"], module)
        uses = _uses(conv, calls, batched)
        if "weight" in params and batched and _uses_ghost_form(conv, uses):
            return super().gramian_then_weighted_gradients(module, calls, params, batched)
        rows = self.per_row_gradients(module, calls, params, batched)
        held = sum(use.inputs.numel() + use.grads.numel() for use in uses)
        if "weight" in params and rows["weight"].numel() > held:
            # Keeping the rows would take more memory than the inputs and output gradients.
            gramian = gram(list(rows.values()))
            del rows
            return gramian, self.weighted_later(module, calls, params, batched)
        return gramian_and_weighted_rows(module, rows)

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
