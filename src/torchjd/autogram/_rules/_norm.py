"""Gramian rule of the element-wise affine parameters of normalisation layers.

``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d`` and ``BatchNorm1d/2d/3d``
(with ``SyncBatchNorm`` and the lazy variants) all end with ``y = x̂ ∘ weight + bias``, broadcast
over the positions that share a parameter entry. The rows are therefore small and materialised
directly: ``Σ_t D_it ∘ x̂_it`` for the weight and ``Σ_t D_it`` for the bias, with ``x̂``
recomputed from the saved input by torch's own normalisation function (same formula, same
``eps``, same statistics), never by re-running the module.

Batch normalisation with batch statistics (training mode, or no running statistics) mixes the
samples, so its per-sample rows are undefined: it is refused when ``batch_dim`` is set, and exact
when ``batch_dim=None`` (``∂y/∂weight = x̂`` whatever the statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Call, GramianRule
from ._common import (
    check_params,
    check_weights,
    common_batch_size,
    first_argument,
    gramian_and_weighted_rows,
    leading_axes,
    rows_of,
    seed_count,
    weighted_calls,
)
from ._registry import register_rule

_BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)
_INSTANCE_NORMS = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)
_SPATIAL_DIMS: dict[type[nn.Module], int] = {
    nn.InstanceNorm1d: 1,
    nn.InstanceNorm2d: 2,
    nn.InstanceNorm3d: 3,
}


@dataclass(eq=False)
class _Normalised:
    """One call: the normalised input ``x̂ = [B, M, P, S]`` and gradients ``[K, B, M, P, S]``.

    ``P`` indexes the parameter entries; ``M`` and ``S`` the positions that share them.
    """

    normalised: Tensor
    grads: Tensor


def _uses_batch_statistics(module: nn.Module) -> bool:
    if isinstance(module, _BATCH_NORMS):
        return module.training or module.running_mean is None
    return False


def _is_synchronised(module: nn.Module) -> bool:
    if not isinstance(module, nn.SyncBatchNorm) or not _uses_batch_statistics(module):
        return False
    distributed = torch.distributed
    return (
        distributed.is_available()
        and distributed.is_initialized()
        and distributed.get_world_size(module.process_group) > 1
    )


def _normalise(module: nn.Module, inputs: Tensor, batched: bool) -> tuple[Tensor, Tensor, int]:
    """Return ``x̂``, the input seen with a batch dim, and where the parameter axis is."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        shape = tuple(module.normalized_shape)
        if batched and inputs.ndim <= len(shape):
            raise ValueError(
                f"Expected the input of {name} to have a batch dim (dim 0) outside its "
                f"normalized_shape {shape} when `batch_dim` is not None; found an input of shape "
                f"{tuple(inputs.shape)}, whose samples would be normalised together."
            )
        if isinstance(module, nn.LayerNorm):
            normalised = F.layer_norm(inputs, shape, None, None, module.eps)
        else:
            normalised = F.rms_norm(inputs, shape, None, module.eps)
        return normalised, inputs, -1
    if isinstance(module, _INSTANCE_NORMS):
        spatial = _instance_dims(module)
        if inputs.ndim == spatial + 1:
            if batched:
                raise ValueError(
                    f"Expected the input of {name} to be batched on dim 0 when `batch_dim` is not "
                    f"None; found an unbatched input of shape {tuple(inputs.shape)}."
                )
            inputs = inputs.unsqueeze(0)
        use_input_stats = module.training or not module.track_running_stats
        normalised = F.instance_norm(
            inputs,
            None if use_input_stats else module.running_mean,
            None if use_input_stats else module.running_var,
            None,
            None,
            use_input_stats,
            0.0,
            module.eps,
        )
        return normalised, inputs, 1
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(inputs, module.num_groups, None, None, module.eps), inputs, 1
    if isinstance(module, _BATCH_NORMS):
        batch_statistics = _uses_batch_statistics(module)
        normalised = F.batch_norm(
            inputs,
            None if batch_statistics else module.running_mean,
            None if batch_statistics else module.running_var,
            None,
            None,
            batch_statistics,
            0.0,
            module.eps,
        )
        return normalised, inputs, 1
    raise TypeError(f"Expected a normalisation layer; found {name}.")


def _instance_dims(module: nn.Module) -> int:
    for module_type, dims in _SPATIAL_DIMS.items():
        if isinstance(module, module_type):
            return dims
    raise TypeError(f"Expected an InstanceNorm layer; found {type(module).__name__}.")


def _normalised_of(module: nn.Module, call: Call, batched: bool) -> _Normalised | None:
    grad = call.grad_outputs[0] if call.grad_outputs else None
    if grad is None:
        return None
    inputs = first_argument(module, call)
    normalised, seen, parameter_axis = _normalise(module, inputs, batched)
    seeds = grad.shape[0]
    grad = grad.reshape(seeds, *seen.shape)
    if parameter_axis == -1:
        entries = math.prod(tuple(module.normalized_shape))  # type: ignore[arg-type]
        batch = seen.shape[0] if batched else 1
        shape = (batch, -1, entries, 1)
    else:
        shape = (seen.shape[0], 1, seen.shape[1], -1)
    return _Normalised(normalised.reshape(shape).to(grad.dtype), grad.reshape(seeds, *shape))


class NormRule(GramianRule):
    """Rows, Gramian and weighted gradients of a normalisation layer's ``weight`` and ``bias``."""

    def check(self, module: nn.Module, batched: bool) -> None:
        name = type(module).__name__
        if batched and _uses_batch_statistics(module):
            raise ValueError(
                f"Found a module of type {name} using batch statistics, which is incompatible "
                "with `batch_dim` not None: batch normalisation mixes the samples, so they have "
                "no separate gradients. Put it in eval mode (running statistics), replace it by "
                "InstanceNorm, GroupNorm or LayerNorm, or use `batch_dim=None`."
            )
        if _is_synchronised(module):
            raise ValueError(
                f"Found a module of type {name} synchronising batch statistics across processes, "
                "which the autogram engine cannot recompute. Put it in eval mode or replace it "
                "by BatchNorm, InstanceNorm, GroupNorm or LayerNorm."
            )

    def needs_graph(self, module: nn.Module) -> bool:
        return False

    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        self.check(module, batched)
        check_params(params, ["weight", "bias"], module)
        seed_count(calls)
        pieces = [
            piece for call in calls if (piece := _normalised_of(module, call, batched)) is not None
        ]
        if batched:
            common_batch_size([piece.normalised.shape[0] for piece in pieces], module)
        result: dict[str, Tensor] = {}
        for name in params:
            total: Tensor | None = None
            for piece in pieces:
                if name == "weight":
                    per_sample = (piece.grads * piece.normalised).sum(dim=(2, 4))
                else:
                    per_sample = piece.grads.sum(dim=(2, 4))
                rows = rows_of(per_sample, batched)
                total = rows if total is None else total + rows
            assert total is not None
            result[name] = total.reshape(total.shape[0], *module.get_parameter(name).shape)
        return result

    def gramian_then_weighted_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
        # The rows are small (one entry per channel): kept, the weighted gradients are products.
        return gramian_and_weighted_rows(
            module, self.per_row_gradients(module, calls, params, batched)
        )

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        seeds = seed_count(calls)
        first = next(g for call in calls for g in call.grad_outputs if g is not None)
        check_weights(weights, seeds, first.shape[1] if first.ndim > 1 else 1, batched)
        self.check(module, batched)
        combined = weighted_calls(calls, weights, batched, leading_axes)
        rows = self.per_row_gradients(module, combined, params, batched=False)
        return {name: row[0] for name, row in rows.items()}


_RULE = NormRule()
for _module_type in (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, *_BATCH_NORMS, *_INSTANCE_NORMS):
    register_rule(_module_type, _RULE)
