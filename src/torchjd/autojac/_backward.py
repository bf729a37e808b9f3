from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from torchjd.aggregation._aggregator_bases import Aggregator

from ._checks import (
    as_ordered_set,
    as_unique_tensors,
    check_aggregator,
    check_parallel_chunk_size,
)
from ._graph import find_leaves
from ._jacobian import OneHotRows, aggregate_into_grads


def backward(
    tensors: Sequence[Tensor] | Tensor,
    aggregator: Aggregator,
    inputs: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    r"""Compute the Jacobian of all the scalars in ``tensors`` with respect to ``inputs``,
    aggregate it into one vector with ``aggregator`` and accumulate the pieces of that vector into
    the ``.grad`` fields of ``inputs``: the Jacobian descent replacement of ``loss.backward()``.

    The Jacobian has one row per scalar of ``tensors`` (flattened row-major, concatenated in
    order) and one column per scalar of ``inputs`` (in order). Like :func:`torch.autograd.backward`,
    the gradients are added to the existing ``.grad`` fields (in place), or stored there when they
    are ``None``.

    :param tensors: The tensors to differentiate (e.g. a vector of losses, or a list of them).
        Each of their scalars is one objective.
    :param aggregator: The aggregator that reduces the Jacobian to one vector (e.g.
        :class:`~torchjd.aggregation.UPGrad`). It is called once, with hooks firing.
    :param inputs: The tensors with respect to which to differentiate (duplicates are ignored).
        By default, the leaf tensors requiring grad that ``tensors`` depend on, in breadth-first
        order of the autograd graph.
    :param retain_graph: Whether to keep the graph after the call, to differentiate through it
        again. When ``False``, the graph is freed once all Jacobian rows are computed.
    :param parallel_chunk_size: How many Jacobian rows to compute at once, with
        :func:`torch.vmap`; ``None`` computes them all at once. Smaller chunks use less memory;
        ``1`` computes them one by one, without ``vmap``.

    .. warning::
        ``vmap`` does not support every graph: outputs of compiled functions, or RNNs on CUDA,
        for example. Pass ``parallel_chunk_size=1`` in that case.

    .. note::
        The mean, sum and constant aggregators need no Jacobian: their result is computed as one
        backward pass. The Gramian-based aggregators (e.g. ``UPGrad``) never concatenate the
        Jacobian: its Gramian is accumulated input by input. Registering a forward hook on the
        aggregator (or on its ``weighting``) makes it receive the full Jacobian, for monitoring.

    >>> import torch
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autojac import backward
    >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> y1 = torch.tensor([-1.0, 1.0]) @ param
    >>> y2 = (param**2).sum()
    >>> backward([y1, y2], UPGrad())
    >>> param.grad
    tensor([0.5000, 2.5000])
    """
    check_parallel_chunk_size(parallel_chunk_size)
    tensors_ = as_unique_tensors(tensors, "tensors")
    if len(tensors_) == 0:
        raise ValueError("`tensors` cannot be empty")
    inputs_ = find_leaves(tensors_) if inputs is None else as_ordered_set(inputs, "inputs")
    check_aggregator(aggregator)
    aggregate_into_grads(
        OneHotRows(tensors_), inputs_, aggregator, retain_graph, parallel_chunk_size
    )
