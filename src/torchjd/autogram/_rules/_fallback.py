"""Jacobian rows as vector-Jacobian products on the graph that the real forward call recorded.

Exact for any module: the module's forward is never re-run, so randomness (dropout masks) and side
effects are those of the real call. This is the engine's generic rule (:data:`FALLBACK_RULE`, for
the direct parameters of modules without a rule), and what the RNN rule and the attention rule with
dropout use (:func:`recorded_rows`, :func:`recorded_weighted_gradients`).

In batched mode, row ``k * B + i`` is the product with the output gradients of seed ``k``
restricted to sample ``i``, which lies on a per-output *sample axis* (``0`` for most outputs; ``1``
for the final hidden states of RNNs): correct whenever the module's outputs of sample ``i`` depend
on its parameters only through sample ``i``'s computations. All the calls of the module are
differentiated together, so a row sums over the calls. Rows go in chunks, each chunk through one
batched backward pass (``is_grads_batched``), or one row at a time for graphs that ``vmap`` cannot
batch. The price is one backward pass through the module per row; the weighted gradients cost a
single one (the output gradients combined by the weights, by linearity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ._base import Call, GramianRule
from ._common import combine_per_sample, leading_axes

# Bounds the memory of one chunk of rows: output-gradient elements fed to one batched backward.
_ELEMENTS_PER_CHUNK = 1 << 24

SampleAxes = Callable[[Call], Sequence[int]]


class FallbackRule(GramianRule):
    """Per-row vector-Jacobian products, for the direct parameters of a module without a rule."""

    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        return recorded_rows(module, calls, params, batched, leading_axes)

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        return recorded_weighted_gradients(module, calls, params, batched, weights, leading_axes)


FALLBACK_RULE = FallbackRule()


def recorded_rows(
    module: nn.Module,
    calls: Sequence[Call],
    params: Sequence[str],
    batched: bool,
    sample_axes: SampleAxes,
) -> dict[str, Tensor]:
    """The Jacobian rows ``[R, *param.shape]`` by vector-Jacobian products on the recorded graph.

    :param sample_axes: For a call, the sample axis of each of its outputs (batched mode).
    """
    tensors = _parameters(module, params)
    targets, grads, axes = _targets(calls, sample_axes)
    seeds = grads[0].shape[0]
    batch = _batch_size(grads, axes) if batched else 1
    count = seeds * batch
    elements_per_row = sum(grad[0].numel() for grad in grads)
    chunk = max(1, _ELEMENTS_PER_CHUNK // max(1, elements_per_row))
    rows = [param.new_empty(count, *param.shape) for param in tensors]
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        if batched:
            row_grads = [
                _rows_of_grad(grad, axis, start, stop, batch) for grad, axis in zip(grads, axes)
            ]
        else:
            row_grads = [grad[start:stop] for grad in grads]
        for accumulator, product in zip(rows, _batched_products(targets, tensors, row_grads)):
            accumulator[start:stop] = product
    return dict(zip(params, rows))


def recorded_weighted_gradients(
    module: nn.Module,
    calls: Sequence[Call],
    params: Sequence[str],
    batched: bool,
    weights: Tensor,
    sample_axes: SampleAxes,
) -> dict[str, Tensor]:
    """``Σ_r weights[r] * row_r``: one product with the weighted output gradients (linearity)."""
    tensors = _parameters(module, params)
    targets, grads, axes = _targets(calls, sample_axes)
    seeds = grads[0].shape[0]
    batch = _batch_size(grads, axes) if batched else 1
    if weights.shape != (seeds * batch,):
        raise ValueError(
            f"Expected `weights` to have shape ({seeds * batch},), one weight per Jacobian row; "
            f"found {tuple(weights.shape)}."
        )
    combined = []
    for grad, axis in zip(grads, axes):
        weights_ = weights.to(dtype=grad.dtype)
        if batched:
            per_sample = weights_.view(seeds, batch)
            mixed = combine_per_sample(grad.movedim(1 + axis, 1), per_sample)
            combined.append(mixed.movedim(0, axis))
        else:
            combined.append(torch.tensordot(weights_, grad, dims=1))
    products = _grads(tensors, targets, combined, is_grads_batched=False)
    return dict(zip(params, products))


def _parameters(module: nn.Module, params: Sequence[str]) -> list[Tensor]:
    if not params:
        raise ValueError("`params` should name at least one parameter.")
    return [module.get_parameter(name) for name in params]


def _targets(
    calls: Sequence[Call], sample_axes: SampleAxes
) -> tuple[list[GradientEdge], list[Tensor], list[int]]:
    """The edges of the outputs that received a gradient, with their gradients and sample axes."""
    targets: list[GradientEdge] = []
    grads: list[Tensor] = []
    axes: list[int] = []
    seen = set()
    for call in calls:
        edges: Sequence[GradientEdge | None] = call.output_edges or (None,) * len(call.outputs)
        for output, edge, grad, axis in zip(
            call.outputs, edges, call.grad_outputs, sample_axes(call)
        ):
            if grad is None or not isinstance(output, Tensor):
                continue
            target = edge if edge is not None else get_gradient_edge(output)
            # The same output returned twice has one gradient, which must be used once.
            if (target.node, target.output_nr) not in seen:
                seen.add((target.node, target.output_nr))
                targets.append(target)
                grads.append(grad)
                axes.append(axis)
    if not grads:
        raise ValueError("Expected at least one call with an output gradient; found none.")
    return targets, grads, axes


def _batch_size(grads: Sequence[Tensor], axes: Sequence[int]) -> int:
    sizes = {
        grad.shape[1 + axis] if grad.ndim > 1 + axis else None for grad, axis in zip(grads, axes)
    }
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "Expected every output that reaches the differentiated tensor to have its samples on "
            "its sample axis (dim 0, or dim 1 for the final states of an RNN), with the same size, "
            f"when `batch_dim` is not None; found output gradients of shapes "
            f"{[tuple(grad.shape[1:]) for grad in grads]} with sample axes {list(axes)}."
        )
    (size,) = sizes
    assert size is not None
    return size


def _rows_of_grad(grad: Tensor, axis: int, start: int, stop: int, batch: int) -> Tensor:
    """The output gradients of rows ``start..stop-1`` (batched mode): ``[n, *output.shape]``."""
    rows = torch.arange(start, stop, device=grad.device)
    per_seed = grad[rows // batch]
    # A comparison rather than `one_hot`, which checks its indices on the host (a sync on GPUs).
    samples = torch.arange(batch, device=grad.device)
    mask = ((rows % batch).unsqueeze(1) == samples).to(dtype=grad.dtype)
    shape = [stop - start] + [1] * (grad.ndim - 1)
    shape[1 + axis] = batch
    return per_seed * mask.reshape(shape)


def _grads(
    inputs: Sequence[Tensor],
    targets: Sequence[GradientEdge],
    grad_outputs: Sequence[Tensor],
    is_grads_batched: bool,
) -> tuple[Tensor, ...]:
    return torch.autograd.grad(
        list(targets),
        list(inputs),
        grad_outputs=list(grad_outputs),
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
        is_grads_batched=is_grads_batched,
    )


def _batched_products(
    targets: Sequence[GradientEdge], inputs: Sequence[Tensor], row_grads: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """``[n, *input.shape]`` for each input: one vector-Jacobian product per row."""
    count = row_grads[0].shape[0]
    if count > 1:
        try:
            return _grads(inputs, targets, row_grads, is_grads_batched=True)
        except Exception:
            # Some backward formulas cannot be batched by vmap: one row at a time (a genuine
            # error is raised again there).
            pass
    products = [
        _grads(inputs, targets, [grad[row] for grad in row_grads], is_grads_batched=False)
        for row in range(count)
    ]
    return tuple(torch.stack(column) for column in zip(*products))
