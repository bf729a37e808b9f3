"""A slow, obviously-correct reference for the per-layer Gramian rules.

The reference never looks inside a rule: a Jacobian row is recomputed with plain autograd, by
re-running the module (on one sample at a time in batched mode) and differentiating the inner
product of its outputs with the row's output gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from torchjd.autogram._rules import Call, GramianRule


@dataclass
class Use:
    """One forward call to record: its arguments, and which output gradients to drop."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_grads: tuple[int, ...] = ()


def tensors_of(output: Any) -> list[Tensor]:
    leaves, _ = tree_flatten(output)
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]


def record_calls(
    module: nn.Module, uses: Sequence[Use], seeds: int, generator: torch.Generator
) -> list[Call]:
    """Run the module on every use and attach random output gradients ``[K, *out.shape]``."""
    calls = []
    for use in uses:
        outputs = tuple(tensors_of(module(*use.args, **use.kwargs)))
        grads: list[Tensor | None] = []
        for index, out in enumerate(outputs):
            if index in use.drop_grads or not out.requires_grad:
                grads.append(None)
            else:
                grads.append(
                    torch.randn(
                        seeds, *out.shape, generator=generator, dtype=out.dtype, device=out.device
                    )
                )
        calls.append(Call(use.args, dict(use.kwargs), outputs, grads))
    return calls


def slice_leading(value: Any, sample: int) -> Any:
    if isinstance(value, Tensor) and value.ndim > 0:
        return value[sample : sample + 1]
    return value


def _inner_product(outputs: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
    total = torch.zeros(())
    for out, grad in zip(outputs, grads):
        if grad is not None:
            total = total + (out * grad).sum()
    return total


def _dense(grad: Tensor | None, like: Tensor) -> Tensor:
    if grad is None:
        return torch.zeros_like(like)
    return grad.to_dense() if grad.is_sparse else grad


def reference_rows(
    module: nn.Module,
    calls: Sequence[Call],
    params: Sequence[str],
    batched: bool,
    slice_args: Callable[[Call, int], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
    output_axes: Sequence[int] | None = None,
    rerun_per_sample: bool = True,
) -> dict[str, Tensor]:
    """The Jacobian rows ``[R, *param.shape]`` of ``params``, by plain autograd.

    Batched mode re-runs the module on each sample alone, unless ``rerun_per_sample`` is False:
    then it re-runs it on the whole batch and keeps the output gradients of one sample (the
    definition of a row for modules whose backward depends on the batch, as with
    ``scale_grad_by_freq``).

    :param slice_args: For batched mode, the arguments of a call restricted to one sample (kept
        batched, of size 1). Defaults to slicing dim 0 of every tensor argument.
    :param output_axes: The sample axis of each output (defaults to 0).
    """
    tensors = [module.get_parameter(name) for name in params]
    seeds = next(g for call in calls for g in call.grad_outputs if g is not None).shape[0]

    def default_slice(call: Call, sample: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = tuple(slice_leading(arg, sample) for arg in call.args)
        kwargs = {key: slice_leading(value, sample) for key, value in call.kwargs.items()}
        return args, kwargs

    slicer = slice_args or default_slice
    rows: list[list[Tensor]] = [[] for _ in params]
    if not batched:
        for seed in range(seeds):
            total = torch.zeros(())
            for call in calls:
                outputs = tensors_of(module(*call.args, **call.kwargs))
                grads = [None if g is None else g[seed] for g in call.grad_outputs]
                total = total + _inner_product(outputs, grads)
            grads_of_params = torch.autograd.grad(total, tensors, allow_unused=True)
            for index, grad in enumerate(grads_of_params):
                rows[index].append(_dense(grad, tensors[index]))
        return {name: torch.stack(row) for name, row in zip(params, rows)}
    batch = next(g for call in calls for g in call.grad_outputs if g is not None).shape[
        1 + (output_axes[0] if output_axes else 0)
    ]
    for seed in range(seeds):
        for sample in range(batch):
            total = torch.zeros(())
            for call in calls:
                if rerun_per_sample:
                    args, kwargs = slicer(call, sample)
                else:
                    args, kwargs = call.args, call.kwargs
                outputs = tensors_of(module(*args, **kwargs))
                grads: list[Tensor | None] = []
                for index, g in enumerate(call.grad_outputs):
                    if g is None:
                        grads.append(None)
                        continue
                    axis = output_axes[index] if output_axes else 0
                    if rerun_per_sample:
                        grads.append(g[seed].narrow(axis, sample, 1))
                    else:
                        mask = torch.zeros(g.shape[1 + axis], dtype=g.dtype)
                        mask[sample] = 1
                        shape = [1] * (g.ndim - 1)
                        shape[axis] = -1
                        grads.append(g[seed] * mask.view(shape))
                total = total + _inner_product(outputs, grads)
            grads_of_params = torch.autograd.grad(total, tensors, allow_unused=True)
            for index, grad in enumerate(grads_of_params):
                rows[index].append(_dense(grad, tensors[index]))
    return {name: torch.stack(row) for name, row in zip(params, rows)}


def assert_rule_matches(
    rule: GramianRule,
    module: nn.Module,
    calls: Sequence[Call],
    params: Sequence[str],
    batched: bool,
    expected_rows: dict[str, Tensor],
    generator: torch.Generator,
    rtol: float,
    atol: float,
) -> None:
    """Check ``per_row_gradients``, ``gramian``, ``weighted_gradients`` and
    ``gramian_then_weighted_gradients`` against the rows."""
    rows = rule.per_row_gradients(module, calls, params, batched)
    assert list(rows) == list(params)
    for name in params:
        assert rows[name].shape == expected_rows[name].shape, name
        torch.testing.assert_close(rows[name], expected_rows[name], rtol=rtol, atol=atol)

    flat = torch.cat(
        [expected_rows[name].reshape(len(expected_rows[name]), -1) for name in params], 1
    )
    expected_gramian = flat @ flat.T
    gramian = rule.gramian(module, calls, params, batched)
    scale = expected_gramian.abs().max().clamp(min=1.0)
    torch.testing.assert_close(gramian, expected_gramian, rtol=rtol, atol=atol * scale)

    weights = torch.randn(flat.shape[0], generator=generator, dtype=flat.dtype)
    weighted = rule.weighted_gradients(module, calls, params, batched, weights)
    assert list(weighted) == list(params)
    for name in params:
        expected = torch.tensordot(weights, expected_rows[name], dims=1)
        actual = weighted[name].to_dense() if weighted[name].is_sparse else weighted[name]
        assert actual.shape == expected.shape, name
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(1, flat.shape[0]))

    fused_gramian, fused_weighted = rule.gramian_then_weighted_gradients(
        module, calls, params, batched
    )
    torch.testing.assert_close(fused_gramian, expected_gramian, rtol=rtol, atol=atol * scale)
    weighted = fused_weighted(weights)
    assert list(weighted) == list(params)
    for name in params:
        expected = torch.tensordot(weights, expected_rows[name], dims=1)
        actual = weighted[name].to_dense() if weighted[name].is_sparse else weighted[name]
        assert actual.shape == expected.shape, name
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(1, flat.shape[0]))


def trainable(module: nn.Module, rule: GramianRule) -> list[str]:
    return [name for name, p in rule.covered_parameters(module).items() if p.requires_grad]
