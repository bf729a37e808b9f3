from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from torchjd.aggregation._aggregator_bases import Aggregator

from ._accumulate import accumulate_grad
from ._checks import (
    as_ordered_set,
    as_unique_tensors,
    check_aggregator,
    check_parallel_chunk_size,
)
from ._graph import find_leaves
from ._jacobian import StackedRows, aggregate_into_grads


def mtl_backward(
    losses: Sequence[Tensor],
    features: Sequence[Tensor] | Tensor,
    aggregator: Aggregator,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    r"""Jacobian descent step for multi-task learning with a shared trunk and one head per task.

    Each task's parameters get the ordinary gradient of that task's (scalar) loss, accumulated
    into their ``.grad``. The shared parameters get the aggregation, by ``aggregator``, of the
    Jacobian of all the losses with respect to them (one row per loss), obtained by the chain rule
    through ``features``, the output of the trunk used by all tasks.

    :param losses: The scalar losses, one per task.
    :param features: The shared representation (or several of them) computed by the trunk from
        the shared parameters and used by the heads.
    :param aggregator: The aggregator that reduces the Jacobian with respect to the shared
        parameters to one vector (e.g. :class:`~torchjd.aggregation.UPGrad`).
    :param tasks_params: The parameters of each task (one iterable per loss). By default, for each
        loss, the leaf tensors requiring grad that it depends on without going through
        ``features``. Tasks may share parameters: their gradients add up.
    :param shared_params: The parameters of the trunk. By default, the leaf tensors requiring grad
        that ``features`` depend on. They must not be among the parameters of any task.
    :param retain_graph: Whether to keep the graph after the call. When ``False``, the graph is
        freed as the gradients are computed, so losses sharing graph nodes above ``features``
        (e.g. a common head layer) need ``True``.
    :param parallel_chunk_size: How many Jacobian rows to compute at once, with
        :func:`torch.vmap`; ``None`` computes them all at once and ``1`` one by one, without
        ``vmap``.

    .. warning::
        ``vmap`` does not support every graph: outputs of compiled functions, or RNNs on CUDA,
        for example. Pass ``parallel_chunk_size=1`` in that case.

    >>> import torch
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autojac import mtl_backward
    >>> shared = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> head = torch.tensor([1.0, 0.5], requires_grad=True)
    >>> features = shared**2
    >>> loss1 = features.sum()
    >>> loss2 = head @ features
    >>> mtl_backward([loss1, loss2], features, UPGrad())
    >>> shared.grad
    tensor([2., 3.])
    >>> head.grad
    tensor([1., 4.])
    """
    check_parallel_chunk_size(parallel_chunk_size)
    losses_ = as_unique_tensors(losses, "losses")
    features_ = as_unique_tensors(features, "features")
    if shared_params is None:
        shared_params_ = find_leaves(features_)
    else:
        shared_params_ = as_ordered_set(shared_params, "shared_params")
    if tasks_params is None:
        tasks_params_ = [find_leaves([loss], excluded=features_) for loss in losses_]
    else:
        if isinstance(tasks_params, Tensor) or not hasattr(tasks_params, "__len__"):
            raise TypeError(
                "`tasks_params` should be a sequence with one iterable of Tensors per loss. "
                f"Found `{type(tasks_params).__name__}`."
            )
        tasks_params_ = [as_ordered_set(params, "tasks_params") for params in tasks_params]

    if len(features_) == 0:
        raise ValueError("`features` cannot be empty.")
    shared_set = dict.fromkeys(shared_params_)
    if any(param in shared_set for params in tasks_params_ for param in params):
        raise ValueError("`tasks_params` should contain no tensor in common with `shared_params`.")
    if any(loss.ndim > 0 for loss in losses_):
        raise ValueError("`losses` should contain only scalars.")
    if len(losses_) == 0:
        raise ValueError("`losses` cannot be empty")
    if len(losses_) != len(tasks_params_):
        raise ValueError("`losses` and `tasks_params` should have the same size.")

    check_aggregator(aggregator)
    # Row i of the Jacobian w.r.t. the shared parameters is the vector-Jacobian product of the
    # features with the gradients of loss i w.r.t. the features.
    stacks = [
        torch.empty((len(losses_), *f.shape), dtype=f.dtype, device=f.device) for f in features_
    ]
    for i, (loss, params) in enumerate(zip(losses_, tasks_params_)):
        inputs = list(dict.fromkeys([*params, *features_]))
        # The retains_grad hook of a non-leaf task parameter would also write its gradient.
        saved_grads = {p: p.grad for p in params if not p.is_leaf and p.retains_grad}
        try:
            grads = torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
        finally:
            for param, saved_grad in saved_grads.items():
                param.grad = saved_grad
        grad_of = dict(zip(inputs, grads))
        for param in params:
            grad = grad_of[param]
            if grad is None:
                accumulate_grad(param, torch.zeros_like(param), owned=True)
            else:
                accumulate_grad(param, grad)
        for feature, stack in zip(features_, stacks):
            grad = grad_of[feature]
            if grad is None:
                stack[i].zero_()
            else:
                stack[i].copy_(grad)
        del grads, grad_of

    aggregate_into_grads(
        StackedRows(features_, stacks),
        shared_params_,
        aggregator,
        retain_graph,
        parallel_chunk_size,
    )
