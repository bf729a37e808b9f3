"""Jacobian rows as vector-Jacobian products on the graph that the real forward call recorded.

Exact for any module (the recorded graph has the real values, dropout masks included), without
re-running anything; the price is one backward pass through the module per row. Row ``k * B + i``
is the product with the output gradients of seed ``k`` restricted to sample ``i``, which lies on a
per-output *sample axis* (``0`` for most outputs; ``1`` for the hidden states of RNNs). All the
calls of the module are differentiated together, so a row sums over the calls. Rows go in chunks,
each chunk through one batched backward (``is_grads_batched``), or one row at a time for graphs
that ``vmap`` cannot batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from ._base import Call
from ._common import common_batch_size

# Bounds the memory of one chunk of rows: output-gradient elements fed to one batched backward.
_ELEMENTS_PER_CHUNK = 1 << 24

SampleAxes = Callable[[Call], Sequence[int]]


def _targets(
    calls: Sequence[Call], sample_axes: SampleAxes
) -> tuple[list[Tensor | GradientEdge], list[Tensor], list[int]]:
    """The differentiable outputs (as their recorded edges when known), gradients and axes."""
    targets: list[Tensor | GradientEdge] = []
    grads: list[Tensor] = []
    axes: list[int] = []
    for call in calls:
        edges: Sequence[GradientEdge | None] = call.output_edges or (None,) * len(call.outputs)
        for output, edge, grad, axis in zip(
            call.outputs, edges, call.grad_outputs, sample_axes(call)
        ):
            if grad is not None and isinstance(output, Tensor) and output.requires_grad:
                targets.append(edge if edge is not None else output)
                grads.append(grad)
                axes.append(axis)
    if not grads:
        raise ValueError("Expected at least one call with an output gradient; found none.")
    return targets, grads, axes


def _grads(
    inputs: Sequence[Tensor],
    targets: Sequence[Tensor | GradientEdge],
    grad_outputs: Sequence[Tensor],
    is_grads_batched: bool,
) -> tuple[Tensor, ...]:
    return torch.autograd.grad(
        list(targets),  # type: ignore[arg-type]  # a mix of tensors and edges is accepted
        list(inputs),
        grad_outputs=list(grad_outputs),
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
        is_grads_batched=is_grads_batched,
    )


def _batched_products(
    targets: Sequence[Tensor | GradientEdge], inputs: Sequence[Tensor], row_grads: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """``[n, *input.shape]`` for each input: one vector-Jacobian product per row."""
    count = row_grads[0].shape[0]
    if count > 1:
        try:
            return _grads(inputs, targets, row_grads, is_grads_batched=True)
        except RuntimeError:
            pass  # Some backward formulas cannot be batched by vmap: one row at a time.
    products = [
        _grads(inputs, targets, [grad[row] for grad in row_grads], is_grads_batched=False)
        for row in range(count)
    ]
    return tuple(torch.stack(column) for column in zip(*products))


def _rows_of_grad(grad: Tensor, axis: int, start: int, stop: int, batch: int) -> Tensor:
    """The output gradients of rows ``start..stop-1`` (batched mode): ``[n, *output.shape]``."""
    rows = torch.arange(start, stop, device=grad.device)
    per_seed = grad[rows // batch]
    mask = torch.nn.functional.one_hot(rows % batch, batch).to(dtype=grad.dtype)
    shape = [stop - start] + [1] * (grad.ndim - 1)
    shape[1 + axis] = batch
    return per_seed * mask.reshape(shape)


def recorded_rows(
    module: nn.Module,
    calls: Sequence[Call],
    params: Sequence[str],
    batched: bool,
    sample_axes: SampleAxes,
) -> dict[str, Tensor]:
    """The Jacobian rows ``[R, *param.shape]`` by vector-Jacobian products on the recorded graph."""
    tensors = [module.get_parameter(name) for name in params]
    targets, grads, axes = _targets(calls, sample_axes)
    seeds = grads[0].shape[0]
    if not batched:
        if seeds == 1:
            products = _grads(tensors, targets, [grad[0] for grad in grads], False)
            return {name: product.unsqueeze(0) for name, product in zip(params, products)}
        products = _batched_products(targets, tensors, grads)
        return dict(zip(params, products))
    batch = common_batch_size([grad.shape[1 + axis] for grad, axis in zip(grads, axes)], module)
    count = seeds * batch
    elements_per_row = sum(grad[0].numel() for grad in grads)
    chunk = max(1, _ELEMENTS_PER_CHUNK // max(1, elements_per_row))
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        row_grads = [
            _rows_of_grad(grad, axis, start, stop, batch) for grad, axis in zip(grads, axes)
        ]
        parts.append(_batched_products(targets, tensors, row_grads))
    return {name: torch.cat(column) for name, column in zip(params, zip(*parts))}


def recorded_weighted_gradients(
    module: nn.Module,
    calls: Sequence[Call],
    params: Sequence[str],
    batched: bool,
    weights: Tensor,
    sample_axes: SampleAxes,
) -> dict[str, Tensor]:
    """``Σ_r weights[r] * row_r``: one product with the weighted output gradients (linearity)."""
    tensors = [module.get_parameter(name) for name in params]
    targets, grads, axes = _targets(calls, sample_axes)
    seeds = grads[0].shape[0]
    combined = []
    for grad, axis in zip(grads, axes):
        weights_ = weights.to(dtype=grad.dtype)
        if batched:
            batch = grad.shape[1 + axis]
            if weights.shape != (seeds * batch,):
                raise ValueError(
                    f"Expected `weights` to have shape ({seeds * batch},), one weight per "
                    f"Jacobian row; found {tuple(weights.shape)}."
                )
            moved = grad.movedim(1 + axis, 1)
            mixed = torch.einsum("ki,ki...->i...", weights_.reshape(seeds, batch), moved)
            combined.append(mixed.movedim(0, axis))
        else:
            if weights.shape != (seeds,):
                raise ValueError(
                    f"Expected `weights` to have shape ({seeds},), one weight per Jacobian row; "
                    f"found {tuple(weights.shape)}."
                )
            combined.append(torch.tensordot(weights_, grad, dims=1))
    products = _grads(tensors, targets, combined, is_grads_batched=False)
    return dict(zip(params, products))
