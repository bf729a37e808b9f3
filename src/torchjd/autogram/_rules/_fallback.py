"""The generic rule: exact for any module, by vector-Jacobian products on the recorded graph.

The module's forward is never re-run: the rows are vector-Jacobian products through the graph that
the real forward call built, so randomness (dropout masks) and side effects are those of the real
call. In batched mode, row ``k * B + i`` is the product with the output gradients of seed ``k``
restricted to sample ``i``: correct whenever the module's outputs ``i`` depend on its parameters
only through sample ``i``'s computations, i.e. for batch-independent modules. Rows are computed in
chunks, each chunk in one batched backward pass (``is_grads_batched``), or one row at a time for
graphs that ``vmap`` cannot batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ._base import Call, GramianRule

# Bounds the memory of one chunk of rows: number of output-gradient elements fed to one backward.
_ELEMENTS_PER_CHUNK = 1 << 24


class FallbackRule(GramianRule):
    """Per-row vector-Jacobian products, for the direct parameters of a module without a rule."""

    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        tensors = _parameters(module, params)
        rows: list[Tensor] | None = None
        for call in calls:
            targets, grads = _differentiable_outputs(call)
            if not grads:
                continue
            num_seeds = grads[0].shape[0]
            batch_size = _batch_size(grads, batched)
            num_rows = num_seeds * batch_size
            if rows is None:
                rows = [param.new_zeros(num_rows, *param.shape) for param in tensors]
            elements_per_row = sum(grad[0].numel() for grad in grads)
            chunk = max(1, _ELEMENTS_PER_CHUNK // max(1, elements_per_row))
            for start in range(0, num_rows, chunk):
                stop = min(num_rows, start + chunk)
                row_grads = [_rows_of_grad(grad, start, stop, batched) for grad in grads]
                products = _batched_vjp(targets, tensors, row_grads)
                for accumulator, product in zip(rows, products):
                    accumulator[start:stop] += product.to(accumulator.dtype)
        if rows is None:
            raise ValueError("Expected at least one call with an output gradient; found none.")
        return dict(zip(params, rows))

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        # The weighted sum of rows is one vector-Jacobian product with the weighted output
        # gradients, by linearity.
        tensors = _parameters(module, params)
        totals = [torch.zeros_like(param) for param in tensors]
        for call in calls:
            targets, grads = _differentiable_outputs(call)
            if not grads:
                continue
            num_seeds = grads[0].shape[0]
            combined = []
            for grad in grads:
                weights_ = weights.to(dtype=grad.dtype)
                if batched:
                    per_sample = weights_.reshape(num_seeds, grad.shape[1])
                    combined.append(torch.einsum("ki,ki...->i...", per_sample, grad))
                else:
                    combined.append(torch.tensordot(weights_, grad, dims=1))
            products = torch.autograd.grad(
                targets,
                tensors,
                grad_outputs=combined,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for total, product in zip(totals, products):
                total += product.to(total.dtype)
        return dict(zip(params, totals))


FALLBACK_RULE = FallbackRule()


def _parameters(module: nn.Module, params: Sequence[str]) -> list[Tensor]:
    if not params:
        raise ValueError("`params` should name at least one parameter.")
    return [module.get_parameter(name) for name in params]


def _differentiable_outputs(call: Call) -> tuple[list[GradientEdge], list[Tensor]]:
    """The edges of the outputs that received a gradient, with their gradients."""
    edges: Sequence[GradientEdge | None] = call.output_edges or (None,) * len(call.outputs)
    targets: list[GradientEdge] = []
    grads: list[Tensor] = []
    seen = set()
    for output, edge, grad in zip(call.outputs, edges, call.grad_outputs):
        if grad is None:
            continue
        target = edge if edge is not None else get_gradient_edge(output)
        # The same output returned twice has one gradient, which must be used once.
        if (target.node, target.output_nr) not in seen:
            seen.add((target.node, target.output_nr))
            targets.append(target)
            grads.append(grad)
    return targets, grads


def _batch_size(grads: Sequence[Tensor], batched: bool) -> int:
    if not batched:
        return 1
    sizes = {grad.shape[1] if grad.ndim > 1 else None for grad in grads}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "Expected every output that reaches the differentiated tensor to have the batch on "
            f"dim 0, with the same size, when `batch_dim` is not None; found output gradients of "
            f"shapes {[tuple(grad.shape[1:]) for grad in grads]}."
        )
    (size,) = sizes
    assert size is not None
    return size


def _rows_of_grad(grad: Tensor, start: int, stop: int, batched: bool) -> Tensor:
    """Output gradients of rows ``start..stop-1``: ``[stop - start, *output.shape]``."""
    if not batched:
        return grad[start:stop]
    batch_size = grad.shape[1]
    rows = torch.arange(start, stop, device=grad.device)
    per_seed = grad[rows // batch_size]
    # A comparison rather than `one_hot`, which checks its indices on the host (a sync on GPUs).
    samples = torch.arange(batch_size, device=grad.device)
    mask = ((rows % batch_size).unsqueeze(1) == samples).to(dtype=grad.dtype)
    return per_seed * mask.reshape(*mask.shape, *([1] * (grad.ndim - 2)))


def _batched_vjp(
    targets: Sequence[GradientEdge], inputs: Sequence[Tensor], row_grads: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """``[n, *input.shape]`` for each input: one vector-Jacobian product per row."""
    num_rows = row_grads[0].shape[0]
    if num_rows > 1:
        try:
            return torch.autograd.grad(
                targets,
                inputs,
                grad_outputs=row_grads,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=True,
            )
        except Exception:
            # Some backward formulas cannot be batched by vmap: one row at a time (a genuine
            # error is raised again there).
            pass
    per_row = [
        torch.autograd.grad(
            targets,
            inputs,
            grad_outputs=[grad[row] for grad in row_grads],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        for row in range(num_rows)
    ]
    return tuple(torch.stack(products) for products in zip(*per_row))
