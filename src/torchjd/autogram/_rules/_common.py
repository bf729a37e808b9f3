"""Bookkeeping shared by the per-layer rules: arguments, seeds, rows and weights.

Every rule is linear in the output gradients, so a weighted sum of rows is the single "row" that
the weighted combination of the output gradients produces: :func:`weighted_calls` builds those
combined calls (one seed, summed over samples), and the rules' summed-mode code does the rest.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ._base import Call

_Item = TypeVar("_Item")

_SIGNATURES: dict[type[nn.Module], inspect.Signature] = {}


def bound_arguments(module: nn.Module, call: Call) -> dict[str, Any]:
    """The arguments of ``call`` by parameter name of ``module.forward``, defaults included."""
    module_type = type(module)
    signature = _SIGNATURES.get(module_type)
    if signature is None:
        signature = inspect.signature(module.forward)
        _SIGNATURES[module_type] = signature
    bound = signature.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def first_argument(module: nn.Module, call: Call) -> Any:
    """The value of the first parameter of ``module.forward`` in ``call`` (``input``, ``x``...)."""
    arguments = bound_arguments(module, call)
    return next(iter(arguments.values()))


def tensor_outputs(call: Call) -> list[tuple[Tensor, Tensor | None]]:
    """The pairs ``(output, grad_output)`` of ``call`` whose output is a tensor."""
    grads: list[Tensor | None] = list(call.grad_outputs)
    grads += [None] * (len(call.outputs) - len(grads))
    return [(out, grad) for out, grad in zip(call.outputs, grads) if isinstance(out, Tensor)]


def seed_count(calls: Sequence[Call]) -> int:
    """The number ``K`` of seeds of the engine's backward, read from the output gradients."""
    for call in calls:
        for out, grad in tensor_outputs(call):
            if grad is not None:
                if grad.shape[1:] != out.shape:
                    raise ValueError(
                        "Expected every grad_output to have shape [K, *output.shape]; found "
                        f"{tuple(grad.shape)} for an output of shape {tuple(out.shape)}."
                    )
                return grad.shape[0]
    raise ValueError("Expected at least one call with an output gradient; found none.")


def common_batch_size(sizes: Sequence[int], module: nn.Module) -> int:
    """The batch size shared by every call (batched mode), or a clear error."""
    if not sizes:
        raise ValueError(f"Expected at least one call of {type(module).__name__}; found none.")
    if any(size != sizes[0] for size in sizes):
        raise ValueError(
            f"Expected every call of {type(module).__name__} to have the same batch size (dim 0) "
            f"when `batch_dim` is not None; found sizes {list(sizes)}."
        )
    return sizes[0]


def rows_of(per_sample: Tensor, batched: bool) -> Tensor:
    """Turn per-seed, per-sample gradients ``[K, B, ...]`` into Jacobian rows ``[R, ...]``.

    Batched mode: row ``k * B + i``; summed mode: row ``k`` sums over the samples.
    """
    if batched:
        return per_sample.reshape(per_sample.shape[0] * per_sample.shape[1], *per_sample.shape[2:])
    return per_sample.sum(dim=1)


def gram(rows: Sequence[Tensor]) -> Tensor:
    """The Gramian of the concatenation of ``rows`` (each ``[R, ...]``), without concatenating."""
    result: Tensor | None = None
    for row in rows:
        flat = row.reshape(row.shape[0], -1)
        term = flat @ flat.T
        result = term if result is None else result + term
    if result is None:
        raise ValueError("`params` should name at least one parameter.")
    return result


def check_weights(weights: Tensor, seeds: int, batch_size: int, batched: bool) -> None:
    """Raise if ``weights`` is not one weight per Jacobian row."""
    expected = seeds * batch_size if batched else seeds
    if weights.shape != (expected,):
        raise ValueError(
            f"Expected `weights` to have shape ({expected},), one weight per Jacobian row; "
            f"found {tuple(weights.shape)}."
        )


def combine_seeds(grad: Tensor, weights: Tensor, batched: bool, sample_axis: int) -> Tensor:
    """Return ``Σ_r weights[r] * (grad of row r)`` as a single-seed gradient ``[1, *shape]``.

    :param grad: An output gradient ``[K, *shape]``.
    :param sample_axis: Where the samples lie in ``shape`` (used in batched mode only).
    """
    seeds = grad.shape[0]
    weights = weights.to(dtype=grad.dtype)
    if not batched:
        return torch.tensordot(weights, grad, dims=1).unsqueeze(0)
    moved = grad.movedim(1 + sample_axis, 1)
    per_sample = weights.reshape(seeds, moved.shape[1])
    return combine_per_sample(moved, per_sample).movedim(0, sample_axis).unsqueeze(0)


def combine_per_sample(grads: Tensor, per_sample: Tensor) -> Tensor:
    """``Σ_k per_sample[k, i] grads[k, i]``: ``[B, ...]`` from ``grads [K, B, ...]``.

    A few seeds are summed one by one: ``einsum`` would run one tiny product per sample.
    """
    seeds, batch = per_sample.shape
    if seeds > 16:
        return torch.einsum("ki,ki...->i...", per_sample, grads)
    shape = (batch,) + (1,) * (grads.ndim - 2)
    combined = grads[0] * per_sample[0].view(shape)
    for seed in range(1, seeds):
        combined.addcmul_(grads[seed], per_sample[seed].view(shape))
    return combined


# The fused step keeps a layer's materialised rows, instead of its inputs and output gradients,
# when they take at most this multiple of their memory: its peak is at the end of the backward
# pass, when every layer's inputs and output gradients are held, and the rows, which replace them
# one layer at a time, save the weighted gradient's product (as costly as the rows themselves).
KEPT_ROWS_FACTOR = 1.5


def keeps_rows(rows: int, held: int) -> bool:
    """Whether the fused step keeps ``rows`` entries of materialised rows in place of the ``held``
    entries of inputs and output gradients they come from (see ``KEPT_ROWS_FACTOR``)."""
    return rows <= KEPT_ROWS_FACTOR * held


def gramian_and_weighted_rows(
    module: nn.Module, rows: Mapping[str, Tensor | Sequence[Tensor]]
) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """The Gramian of materialised ``rows`` (``[R, *param.shape]`` by name), and the function of
    the weights ``[R]`` giving their weighted sums (see :func:`weighted_rows`).

    A list of tensors is the rows of one parameter in parts (``[R, ...]`` each, the parameter's
    flattened entries in order): a rule may materialise large rows that way, so that no single
    allocation is much larger than the layer's own tensors.
    """
    gramian = gram([part for value in rows.values() for part in _parts(value)])
    return gramian, weighted_rows(module, rows)


def weighted_rows(
    module: nn.Module, rows: Mapping[str, Tensor | Sequence[Tensor]]
) -> Callable[[Tensor], dict[str, Tensor]]:
    """The function of the weights ``[R]`` giving the weighted sums of the materialised ``rows``
    (``[R, *param.shape]`` by name, or in parts as in :func:`gramian_and_weighted_rows`): one
    ``[R] @ [R, p]`` product per part, each parameter's rows freed once used."""
    parts_by_name = {name: _parts(value) for name, value in rows.items()}
    count = next(iter(parts_by_name.values()))[0].shape[0]

    def weighted(weights: Tensor) -> dict[str, Tensor]:
        if weights.shape != (count,):
            raise ValueError(
                f"Expected `weights` to have shape ({count},), one weight per Jacobian row; "
                f"found {tuple(weights.shape)}."
            )
        result = {}
        for name in list(parts_by_name):
            parts = parts_by_name.pop(name)
            parameter = module.get_parameter(name)
            products = [weights.to(dtype=part.dtype) @ part.reshape(count, -1) for part in parts]
            flat = products[0] if len(products) == 1 else torch.cat(products)
            result[name] = flat.view(parameter.shape).to(dtype=parameter.dtype)
        return result

    return weighted


def _parts(value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [value] if isinstance(value, Tensor) else list(value)


def weighted_calls(
    calls: Sequence[Call],
    weights: Tensor,
    batched: bool,
    sample_axes: Callable[[Call], Sequence[int]],
) -> list[Call]:
    """The calls with their output gradients combined by ``weights`` into a single seed.

    The summed-mode rows of these calls are the weighted sums of the original rows.

    :param sample_axes: For a call, the sample axis of each of its outputs (batched mode).
    """
    combined_calls = []
    for call in calls:
        axes = sample_axes(call)
        grads: list[Tensor | None] = []
        for index, grad in enumerate(call.grad_outputs):
            if grad is None:
                grads.append(None)
            else:
                grads.append(combine_seeds(grad, weights, batched, axes[index]))
        combined_calls.append(Call(call.args, call.kwargs, call.outputs, grads, call.output_edges))
    return combined_calls


def leading_axes(call: Call) -> list[int]:
    """Sample axis 0 for every output (the common case)."""
    return [0] * len(call.outputs)


def parameter(module: nn.Module, name: str) -> Tensor:
    """The parameter called ``name`` in ``module`` (dotted names reach into children)."""
    return module.get_parameter(name)


def check_params(params: Sequence[str], known: Sequence[str], module: nn.Module) -> None:
    """Raise if ``params`` is empty or names a parameter the rule does not cover."""
    if not params:
        raise ValueError("`params` should name at least one parameter.")
    unknown = [name for name in params if name not in known]
    if unknown:
        raise ValueError(
            f"Expected `params` to name parameters of {type(module).__name__} among "
            f"{list(known)}; found {unknown}."
        )


def sum_over_pairs(items: Sequence[_Item], pair: Callable[[_Item, _Item], Tensor]) -> Tensor:
    """``Σ_{u,v} pair(items[u], items[v])`` for a ``pair`` with ``pair(b, a) = pair(a, b)ᵀ``: the
    Gramian of rows summed over several calls, each cross term computed once."""
    total: Tensor | None = None
    for u, first in enumerate(items):
        part = pair(first, first)
        for second in items[u + 1 :]:
            cross = pair(first, second)
            part = part + cross + cross.T
        total = part if total is None else total + part
    if total is None:
        raise ValueError("Expected at least one call.")
    return total
