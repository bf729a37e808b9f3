"""Recording calls by hand, and the reference Jacobian rows of a rule (plain autograd, loops)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_leaves

from torchjd.autogram._rules import Call


def record(module: nn.Module, *args: Any, num_seeds: int, **kwargs: Any) -> Call:
    """Call ``module`` and return the call with random output gradients ``[K, *out.shape]``."""
    output = module(*args, **kwargs)
    outputs = tuple(leaf for leaf in tree_leaves(output) if isinstance(leaf, Tensor))
    grads: list[Tensor | None] = [
        torch.randn(num_seeds, *out.shape, dtype=out.dtype) if out.requires_grad else None
        for out in outputs
    ]
    edges = tuple(get_gradient_edge(out) if out.requires_grad else None for out in outputs)
    return Call(args=args, kwargs=kwargs, outputs=outputs, grad_outputs=grads, output_edges=edges)


def reference_rows(calls: Sequence[Call], params: Sequence[Tensor], batched: bool) -> list[Tensor]:
    """Row ``k * B + i`` (batched) or ``k`` (summed): ``Σ_calls ∂⟨grad[k] (sample i), out⟩/∂θ``."""
    first = next(grad for call in calls for grad in call.grad_outputs if grad is not None)
    num_seeds = first.shape[0]
    batch_size = first.shape[1] if batched else 1
    rows: list[list[Tensor]] = [[] for _ in params]
    for k in range(num_seeds):
        for i in range(batch_size):
            total = torch.zeros((), dtype=torch.float64)
            for call in calls:
                for out, grad in zip(call.outputs, call.grad_outputs):
                    if grad is None:
                        continue
                    seed = grad[k]
                    if batched:
                        mask = torch.zeros(batch_size, dtype=seed.dtype)
                        mask[i] = 1.0
                        seed = seed * mask.reshape(-1, *([1] * (seed.ndim - 1)))
                    total = total + (seed * out).sum().double()
            grads = torch.autograd.grad(
                total, params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            for index, grad_ in enumerate(grads):
                rows[index].append(grad_)
    return [torch.stack(row) for row in rows]


def gram(rows: Sequence[Tensor]) -> Tensor:
    flat = torch.cat([row.reshape(row.shape[0], -1) for row in rows], dim=1)
    return flat @ flat.T
