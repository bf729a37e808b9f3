"""The engine behind :func:`backward` and :func:`mtl_backward`: Jacobian rows as vector-Jacobian
products, their aggregation, and the accumulation of the result into ``.grad``.

A Jacobian row is the vector-Jacobian product of some ``outputs`` with one "row vector" of
cotangents (one tensor per output): a one-hot vector for :func:`backward`, the gradients of one
task's loss with respect to the features for :func:`mtl_backward`. Rows are computed in chunks: a
chunk of one row is one call to :func:`torch.autograd.grad`, a larger chunk is one call vectorised
with :func:`torch.vmap`; every chunk but the last keeps the graph.

Three strategies, chosen so that the result is that of ``aggregator(J)`` with ``J`` the ``m x N``
Jacobian (columns in input order), and so that nothing the user can observe differs:

* generic: ``J`` is allocated once; hooks on the inputs copy each gradient into its columns as
  soon as autograd produces it and hand autograd a view of ``J`` instead, so a chunk of rows never
  exists twice (peak: ``J`` plus the largest block of one chunk); the aggregator is called on
  ``J`` (its hooks fire);
* Gramian: for a :class:`~torchjd.aggregation._aggregator_bases.GramianWeightedAggregator`
  nobody observes, the per-input blocks ``J_b`` are kept apart (never concatenated), the Gramian
  is accumulated as ``G = sum_b J_b J_bᵀ``, the weights are ``gramian_weighting(G)`` and each
  input gets ``w @ J_b``;
* weighted product: for an unobserved :class:`~torchjd.aggregation._aggregator_bases.
  WeightedAggregator` whose weighting only reads the number of rows (mean, sum, constant weights),
  the result ``w @ J`` is a single vector-Jacobian product with the row vectors combined by ``w``:
  no Jacobian at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.modules.module as torch_module
from torch import Tensor, nn

from torchjd.aggregation._aggregator_bases import (
    Aggregator,
    GramianWeightedAggregator,
    WeightedAggregator,
    _gramian_of_rows,
)
from torchjd.aggregation._constant import ConstantWeighting
from torchjd.aggregation._mean import MeanWeighting
from torchjd.aggregation._sum import SumWeighting
from torchjd.aggregation._weighting_bases import Weighting, _Composition

from ._accumulate import accumulate_grad

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# Weightings whose output depends on their input only through its number of rows.
_ROW_COUNT_WEIGHTINGS = (MeanWeighting, SumWeighting, ConstantWeighting)


class Rows(ABC):
    """The row vectors that define the Jacobian rows: row ``r`` is the vector-Jacobian product of
    ``outputs`` with the cotangents ``(c[r] for c in <cotangents of each output>)``."""

    def __init__(self, outputs: Sequence[Tensor], n_rows: int) -> None:
        self.outputs = tuple(outputs)
        self.n_rows = n_rows

    @abstractmethod
    def chunk(self, start: int, stop: int) -> tuple[Tensor, ...]:
        """Cotangents of rows ``start:stop``: one tensor ``[stop - start, *output.shape]`` per
        output."""

    @abstractmethod
    def combine(self, weights: Tensor) -> tuple[Tensor, ...]:
        """The cotangents ``sum_r weights[r] * row_r``: one tensor of ``output.shape`` per
        output."""


class OneHotRows(Rows):
    """Row ``r`` is the gradient of the ``r``-th scalar of the outputs, flattened row-major and
    concatenated in order. Only the cotangents of one chunk exist at a time (``O(chunk * m)``
    memory)."""

    def __init__(self, outputs: Sequence[Tensor]) -> None:
        self._offsets = []
        offset = 0
        for output in outputs:
            self._offsets.append(offset)
            offset += output.numel()
        super().__init__(outputs, offset)

    def chunk(self, start: int, stop: int) -> tuple[Tensor, ...]:
        cotangents = []
        for output, offset in zip(self.outputs, self._offsets):
            block = torch.zeros(
                (stop - start, output.numel()), dtype=output.dtype, device=output.device
            )
            first = max(start, offset)
            last = min(stop, offset + output.numel())
            if first < last:
                square = block[first - start : last - start, first - offset : last - offset]
                square.diagonal().fill_(1)
            cotangents.append(block.view((stop - start, *output.shape)))
        return tuple(cotangents)

    def combine(self, weights: Tensor) -> tuple[Tensor, ...]:
        return tuple(
            weights[offset : offset + output.numel()]
            .to(dtype=output.dtype, device=output.device)
            .view(output.shape)
            for output, offset in zip(self.outputs, self._offsets)
        )


class StackedRows(Rows):
    """Row ``r`` is given explicitly: ``stacks[k][r]`` is its cotangent for ``outputs[k]``."""

    def __init__(self, outputs: Sequence[Tensor], stacks: Sequence[Tensor]) -> None:
        super().__init__(outputs, stacks[0].shape[0] if stacks else 0)
        self._stacks = tuple(stacks)

    def chunk(self, start: int, stop: int) -> tuple[Tensor, ...]:
        return tuple(stack[start:stop] for stack in self._stacks)

    def combine(self, weights: Tensor) -> tuple[Tensor, ...]:
        return tuple(
            torch.tensordot(weights.to(dtype=stack.dtype, device=stack.device), stack, dims=1)
            for stack in self._stacks
        )


def aggregate_into_grads(
    rows: Rows,
    inputs: Sequence[Tensor],
    aggregator: Aggregator,
    retain_graph: bool,
    parallel_chunk_size: int | None,
) -> None:
    """Compute the Jacobian defined by ``rows`` with respect to ``inputs``, aggregate it with
    ``aggregator`` and accumulate the pieces of the result into the ``.grad`` of the inputs.

    Does nothing at all (not even freeing the graph) when ``inputs`` is empty.
    """
    if len(inputs) == 0:
        return
    # The retains_grad hook of a non-leaf input writes each row's gradient into its .grad (a
    # batched tensor under vmap); what the user must see there is the aggregation only.
    saved_grads = {x: x.grad for x in inputs if not x.is_leaf and x.retains_grad}
    try:
        if rows.n_rows > 0:
            weighting = _unobserved_row_count_weighting(aggregator)
            if weighting is not None:
                _weighted_product(rows, inputs, weighting, retain_graph, saved_grads)
                return
            gramian_weighting = _unobserved_gramian_weighting(aggregator)
            if gramian_weighting is not None:
                _gramian(
                    rows, inputs, gramian_weighting, retain_graph, parallel_chunk_size, saved_grads
                )
                return
        _generic(rows, inputs, aggregator, retain_graph, parallel_chunk_size, saved_grads)
    finally:
        _restore(saved_grads)


def _restore(saved_grads: dict[Tensor, Tensor | None], *, done: bool = True) -> None:
    """Put back the ``.grad`` of non-leaf inputs as it was before any row was computed; once
    ``done``, forget them so that the accumulation that follows is kept."""
    for tensor, grad in saved_grads.items():
        tensor.grad = grad
    if done:
        saved_grads.clear()


def _promoted_dtype(inputs: Sequence[Tensor]) -> torch.dtype:
    dtype = inputs[0].dtype
    for x in inputs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _vectorized(fn: Callable[..., Any], *args: Tensor) -> Any:
    """``torch.vmap(fn)(*args)``, with a hint at the workaround when vmap fails."""
    try:
        return torch.vmap(fn)(*args)
    except RuntimeError as error:
        message = str(error)
        if any(word in message.lower() for word in ("vmap", "batch", "sparse")):
            raise RuntimeError(
                f"{message}\nThe Jacobian rows are computed in parallel with `torch.vmap`, which "
                "does not support every graph (e.g. compiled functions, RNNs on CUDA, sparse "
                "gradients). Pass `parallel_chunk_size=1` to compute them one by one."
            ) from error
        raise


def _vjp(
    outputs: tuple[Tensor, ...],
    inputs: Sequence[Tensor],
    cotangents: tuple[Tensor, ...],
    retain_graph: bool,
) -> list[Tensor]:
    """Jacobian rows for a chunk of ``k`` rows: one block ``[k, *x.shape]`` per input (unused
    inputs get zeros, expanded rather than allocated when possible)."""

    def vjp(*chunk_cotangents: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(
            outputs, inputs, chunk_cotangents, retain_graph=retain_graph, allow_unused=True
        )
        return tuple(_dense_grad(grad, x) for grad, x in zip(grads, inputs))

    if cotangents[0].shape[0] == 1:
        return [block.unsqueeze(0) for block in vjp(*(c[0] for c in cotangents))]
    return list(_vectorized(vjp, *cotangents))


def _dense_grad(grad: Tensor | None, x: Tensor) -> Tensor:
    if grad is None:
        return torch.zeros_like(x)
    if grad.layout != torch.strided:  # e.g. sparse gradients of embeddings
        return grad.to_dense()
    return grad


def _copy_hook(destination: Tensor) -> Callable[[Tensor], Tensor | None]:
    """Tensor hook that writes the gradient of an input into ``destination`` (its columns of the
    Jacobian rows) and hands back a view of it, so that autograd releases its own copy."""

    def hook(grad: Tensor) -> Tensor | None:
        if grad.layout != torch.strided:  # e.g. sparse gradients of embeddings
            destination.copy_(grad.to_dense().reshape(-1))
            return None  # A hook may not change the layout; autograd keeps its copy.
        destination.copy_(grad.reshape(-1))
        if destination.dtype != grad.dtype:
            return None  # Nor the dtype.
        return destination.view(grad.shape)

    return hook


def _vjp_into(
    outputs: tuple[Tensor, ...],
    inputs: Sequence[Tensor],
    cotangents: tuple[Tensor, ...],
    retain_graph: bool,
    destination: Tensor,
    spans: Sequence[tuple[int, int]],
) -> None:
    """Write the Jacobian rows of a chunk into ``destination`` (``[k, N]``), input ``i`` into
    columns ``spans[i]``. Hooks on the inputs copy each gradient as soon as autograd produces it,
    so the chunk never exists twice."""
    used = [True] * len(inputs)

    def vjp(rows_destination: Tensor, *chunk_cotangents: Tensor) -> Tensor:
        handles = [
            x.register_hook(_copy_hook(rows_destination[start:stop]))
            for x, (start, stop) in zip(inputs, spans)
            if x.requires_grad  # Otherwise autograd.grad raises its own error.
        ]
        try:
            grads = torch.autograd.grad(
                outputs, inputs, chunk_cotangents, retain_graph=retain_graph, allow_unused=True
            )
        finally:
            for handle in handles:
                handle.remove()
        for i, grad in enumerate(grads):
            used[i] = grad is not None
        return rows_destination

    if destination.shape[0] == 1:
        vjp(destination[0], *(c[0] for c in cotangents))
    else:
        _vectorized(vjp, destination, *cotangents)
    for is_used, (start, stop) in zip(used, spans):
        if not is_used:
            destination[:, start:stop].zero_()


def _chunk_bounds(
    m: int, retain_graph: bool, parallel_chunk_size: int | None
) -> Iterator[tuple[int, int, bool]]:
    """Yield ``(start, stop, keep_graph)`` for consecutive chunks of rows. The graph is kept for
    all chunks but the last, which uses ``retain_graph``."""
    if m == 0:
        return
    size = m if parallel_chunk_size is None else min(parallel_chunk_size, m)
    for start in range(0, m, size):
        stop = min(start + size, m)
        yield start, stop, retain_graph or stop < m


def _jacobian_blocks(
    rows: Rows,
    inputs: Sequence[Tensor],
    retain_graph: bool,
    parallel_chunk_size: int | None,
    saved_grads: dict[Tensor, Tensor | None],
) -> list[Tensor]:
    """The blocks ``[m, *x.shape]`` of the Jacobian, one per input, never concatenated. With one
    chunk they are what autograd returns; with several, each chunk is copied into blocks
    allocated once, and freed before the next."""
    m = rows.n_rows
    blocks: list[Tensor] = []
    for start, stop, keep_graph in _chunk_bounds(m, retain_graph, parallel_chunk_size):
        chunk_blocks = _vjp(rows.outputs, inputs, rows.chunk(start, stop), keep_graph)
        # Under vmap, the retains_grad hooks leave batched tensors in .grad: put back the saved
        # ones before the next chunk.
        _restore(saved_grads, done=False)
        if start == 0 and stop == m:
            return chunk_blocks
        if start == 0:
            blocks = [torch.empty((m, *x.shape), dtype=x.dtype, device=x.device) for x in inputs]
        for block, chunk_block in zip(blocks, chunk_blocks):
            block[start:stop].copy_(chunk_block)
        del chunk_blocks
    return blocks


def _generic(
    rows: Rows,
    inputs: Sequence[Tensor],
    aggregator: Aggregator,
    retain_graph: bool,
    parallel_chunk_size: int | None,
    saved_grads: dict[Tensor, Tensor | None],
) -> None:
    device = inputs[0].device
    if any(x.device != device for x in inputs):
        devices = ", ".join(dict.fromkeys(str(x.device) for x in inputs))
        raise ValueError(
            "All `inputs` should be on the same device to form the Jacobian given to "
            f"{aggregator}. Found devices: {devices}."
        )
    m = rows.n_rows
    sizes = [x.numel() for x in inputs]
    spans = []
    column = 0
    for size in sizes:
        spans.append((column, column + size))
        column += size
    n_columns = column

    matrix = torch.empty((m, n_columns), dtype=_promoted_dtype(inputs), device=device)
    for start, stop, keep_graph in _chunk_bounds(m, retain_graph, parallel_chunk_size):
        cotangents = rows.chunk(start, stop)
        _vjp_into(rows.outputs, inputs, cotangents, keep_graph, matrix[start:stop], spans)
        _restore(saved_grads, done=False)

    _restore(saved_grads)
    aggregation = aggregator(matrix)
    del matrix
    if not isinstance(aggregation, Tensor) or aggregation.shape != (n_columns,):
        found = aggregation.shape if isinstance(aggregation, Tensor) else type(aggregation)
        raise ValueError(
            f"The aggregator {aggregator} should return a vector of length {n_columns} (the "
            f"number of columns of the Jacobian). Found {found}."
        )
    for x, (start, stop) in zip(inputs, spans):
        accumulate_grad(x, aggregation[start:stop])


def _gramian(
    rows: Rows,
    inputs: Sequence[Tensor],
    gramian_weighting: Weighting[Tensor],
    retain_graph: bool,
    parallel_chunk_size: int | None,
    saved_grads: dict[Tensor, Tensor | None],
) -> None:
    m = rows.n_rows
    blocks = _jacobian_blocks(rows, inputs, retain_graph, parallel_chunk_size, saved_grads)
    dtype = _promoted_dtype(inputs)
    # Same precision rule as the aggregator's own Gramian (half-precision Gramians lose digits).
    gramian_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
    device = inputs[0].device
    gramian = torch.zeros((m, m), dtype=gramian_dtype, device=device)
    for block in blocks:
        matrix = block.reshape(m, -1).to(gramian_dtype)
        gramian += (matrix @ matrix.T).to(device)

    _restore(saved_grads)
    weights = gramian_weighting(gramian)
    for i, x in enumerate(inputs):
        matrix = blocks[i].reshape(m, -1).to(dtype)
        blocks[i] = blocks[i].new_empty(0)  # Free each block once used.
        grad = weights.to(dtype=dtype, device=matrix.device) @ matrix
        del matrix
        accumulate_grad(x, grad, owned=True)


def _weighted_product(
    rows: Rows,
    inputs: Sequence[Tensor],
    weighting: Weighting[Tensor],
    retain_graph: bool,
    saved_grads: dict[Tensor, Tensor | None],
) -> None:
    # The weighting reads only the number of rows: an empty-column matrix stands for J.
    stand_in = torch.empty((rows.n_rows, 0), dtype=_promoted_dtype(inputs), device=inputs[0].device)
    weights = weighting(stand_in)
    grads = torch.autograd.grad(
        rows.outputs,
        inputs,
        rows.combine(weights),
        retain_graph=retain_graph,
        allow_unused=True,
    )
    _restore(saved_grads)
    for x, grad in zip(inputs, grads):
        if grad is None:
            accumulate_grad(x, torch.zeros_like(x), owned=True)
        else:
            # Autograd may hand back a cotangent itself (e.g. through an addition), which can be
            # a view of the weights: never own it.
            accumulate_grad(x, grad)


def _is_unobserved(module: nn.Module) -> bool:
    """Whether calling ``module`` runs nothing but its ``forward``: no forward hooks on it and no
    global ones."""
    global_hooks: list[dict[int, Callable[..., object]]] = [
        getattr(torch_module, "_global_forward_hooks", {}),
        getattr(torch_module, "_global_forward_pre_hooks", {}),
    ]
    return (
        not module._forward_hooks
        and not module._forward_pre_hooks
        and not any(global_hooks)
        and type(module).__call__ in (Aggregator.__call__, Weighting.__call__)
    )


def _is_plain_weighted_aggregator(aggregator: WeightedAggregator) -> bool:
    """Whether calling ``aggregator`` only computes ``combine(matrix, weighting(matrix))``."""
    cls = type(aggregator)
    return (
        cls.forward is WeightedAggregator.forward
        and cls.combine is WeightedAggregator.combine
        and _is_unobserved(aggregator)
    )


def _unobserved_row_count_weighting(aggregator: Aggregator) -> Weighting[Tensor] | None:
    if not isinstance(aggregator, WeightedAggregator) or not _is_plain_weighted_aggregator(
        aggregator
    ):
        return None
    weighting = aggregator.weighting
    if type(weighting) not in _ROW_COUNT_WEIGHTINGS or not _is_unobserved(weighting):
        return None
    return weighting


def _unobserved_gramian_weighting(aggregator: Aggregator) -> Weighting[Tensor] | None:
    if not isinstance(aggregator, GramianWeightedAggregator) or not _is_plain_weighted_aggregator(
        aggregator
    ):
        return None
    composition = aggregator.weighting
    if (
        type(composition) is not _Composition
        or composition.fn is not _gramian_of_rows
        or not _is_unobserved(composition)
    ):
        return None
    return cast(Weighting[Tensor], composition.weighting)
