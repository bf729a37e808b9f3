"""The forward hooks of the engine: one :class:`Record` per call of a hooked module.

A record holds references (never copies) to what the module received, and the gradient edges of
its outputs and inputs, taken when the call returned: later in-place operations
(``ReLU(inplace=True)`` on a layer's output) give the tensors a new ``grad_fn``, while the edges
keep pointing at the module's own graph. The outputs themselves are held weakly, so that an output
that nothing else uses is freed as in an ordinary forward pass (e.g. a Linear's output followed by
a ReLU, which saves its own result); views are the exception (see :class:`Record`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves

from ._rules import Call


@dataclass(eq=False)
class Record:
    """One recorded forward call of a hooked module.

    :param call: What the rules see; its ``outputs`` are set by :meth:`resolve_outputs`.
    :param module: The module that was called.
    :param order: Position of the call among the engine's records (a call returns after the calls
        nested in it, so an enclosing call has a larger order than the calls it contains).
    :param input_nodes: The autograd nodes of the tensor inputs that require grad.
    :param input_versions: The tensor inputs with their version counters when the call returned.
    :param uses_batch_statistics: Whether the module is a batch norm normalising with the
        statistics of the batch in this call.
    :param output_versions: The version counter of each output when the call returned.
    :param output_bases: For each output that is a reshaping view of a whole tensor (e.g. what
        ``F.linear`` returns for 3-d inputs), the gradient edge of that base tensor, else ``None``.
        An in-place operation on such a view rewires the graph around the view's own node (a
        ``CopySlices`` node on the base), so its gradient is then taken at the base's edge.
    :param output_refs: Each output, held weakly, except views that require grad: an in-place
        operation on a view changes where its gradient must be taken, which only its version
        counter tells (a view shares it with its base, hence keeps the base's memory alive).
    :param output_specs: The shape, dtype, device and ``requires_grad`` of each output.
    :param entry_nodes: The nodes at which the gradient towards the call's outputs was taken (set
        by the engine's backward pass).
    """

    call: Call
    module: nn.Module
    order: int
    input_nodes: frozenset[Node]
    input_versions: tuple[tuple[Tensor, int], ...]
    uses_batch_statistics: bool
    output_versions: tuple[int, ...]
    output_bases: tuple[GradientEdge | None, ...]
    output_refs: tuple[Tensor | weakref.ref[Tensor], ...]
    output_specs: tuple[tuple[torch.Size, torch.dtype, torch.device, bool], ...]
    entry_nodes: frozenset[Node] = frozenset()

    def has_gradient(self) -> bool:
        return any(grad is not None for grad in self.call.grad_outputs)

    def output(self, index: int) -> Tensor | None:
        """The output ``index`` if it is still alive."""
        ref = self.output_refs[index]
        return ref if isinstance(ref, Tensor) else ref()

    def resolve_outputs(self) -> None:
        """Give the call its outputs: those still alive, and stand-ins for the freed ones.

        A stand-in is a tensor on the ``meta`` device with the shape, dtype and ``requires_grad``
        of the output: rules only read these (and never the values of the outputs).
        """
        outputs = []
        for index in range(len(self.output_specs)):
            tensor = self.output(index)
            outputs.append(_stand_in(self.output_specs[index]) if tensor is None else tensor)
        self.call.outputs = tuple(outputs)

    def release_views(self) -> None:
        """Hold the view outputs weakly too, and give the call stand-ins for them.

        Called once the engine has read their version counters (the reason why they were held):
        a view keeps its base's memory alive (e.g. the output of ``F.linear`` on a 3-d input),
        which, for a layer whose output nothing else saves, would stay allocated until the step
        ends instead of being freed with the graph.
        """
        held = [isinstance(ref, Tensor) for ref in self.output_refs]
        if not any(held):
            return
        self.output_refs = tuple(
            weakref.ref(ref) if isinstance(ref, Tensor) else ref for ref in self.output_refs
        )
        self.call.outputs = tuple(
            _stand_in(spec) if was_held else output
            for was_held, output, spec in zip(held, self.call.outputs, self.output_specs)
        )


def _stand_in(spec: tuple[torch.Size, torch.dtype, torch.device, bool]) -> Tensor:
    shape, dtype, _, requires_grad = spec
    tensor = torch.empty(shape, dtype=dtype, device="meta")
    return tensor.requires_grad_() if requires_grad else tensor


class Recorder:
    """Collects the calls of the hooked modules between two Gramian computations.

    The hooks hold this object, not the engine, so that the engine can be garbage-collected (which
    removes the hooks).
    """

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.paused = False
        self._next_order = 0

    def hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        # While the engine differentiates (e.g. activation checkpointing re-runs forwards inside
        # the backward pass), the calls are not new uses of the modules.
        if self.paused or not torch.is_grad_enabled():
            return
        # The common cases (one output tensor, positional tensor arguments) skip the pytree walks
        # and the per-output loops (the hook runs on every call of every hooked module).
        if not kwargs and all(isinstance(arg, Tensor) for arg in args):
            inputs: Sequence[Tensor] = args
        else:
            inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]
        if isinstance(output, Tensor):
            if not output.requires_grad:
                return
            single = (output,)
            output_edges: tuple[GradientEdge | None, ...] = (get_gradient_edge(output),)
            output_versions: tuple[int, ...] = (output._version,)
            output_bases: tuple[GradientEdge | None, ...] = (_reshaped_base_edge(output, single),)
            output_refs: tuple[Tensor | weakref.ref[Tensor], ...] = (
                output if output._is_view() else weakref.ref(output),
            )
            output_specs: tuple[tuple[torch.Size, torch.dtype, torch.device, bool], ...] = (
                (output.shape, output.dtype, output.device, True),
            )
        else:
            outputs = tuple(leaf for leaf in tree_leaves(output) if isinstance(leaf, Tensor))
            if not any(tensor.requires_grad for tensor in outputs):
                return
            output_edges = tuple(
                get_gradient_edge(tensor) if tensor.requires_grad else None for tensor in outputs
            )
            output_versions = tuple(tensor._version for tensor in outputs)
            output_bases = tuple(_reshaped_base_edge(tensor, outputs) for tensor in outputs)
            output_refs = tuple(
                tensor if tensor.requires_grad and tensor._is_view() else weakref.ref(tensor)
                for tensor in outputs
            )
            output_specs = tuple(
                (tensor.shape, tensor.dtype, tensor.device, tensor.requires_grad)
                for tensor in outputs
            )
        input_nodes = frozenset(
            tensor.grad_fn if tensor.grad_fn is not None else get_gradient_edge(tensor).node
            for tensor in inputs
            if tensor.requires_grad
        )
        record = Record(
            call=Call(args=args, kwargs=kwargs, outputs=(), output_edges=output_edges),
            module=module,
            order=self._next_order,
            input_nodes=input_nodes,
            input_versions=tuple((tensor, tensor._version) for tensor in inputs),
            uses_batch_statistics=_uses_batch_statistics(module),
            output_versions=output_versions,
            output_bases=output_bases,
            output_refs=output_refs,
            output_specs=output_specs,
        )
        self._next_order += 1
        self.records.append(record)

    def take(self) -> list[Record]:
        """Return the records and forget them."""
        records = self.records
        self.records = []
        self._next_order = 0
        return records


def _uses_batch_statistics(module: nn.Module) -> bool:
    if not isinstance(module, _BatchNorm):
        return False
    return module.training or module.running_mean is None


def _reshaped_base_edge(tensor: Tensor, outputs: tuple[Tensor, ...]) -> GradientEdge | None:
    """The edge of ``tensor``'s base if ``tensor`` is a contiguous view of all of it."""
    if not tensor.requires_grad or not tensor._is_view():
        return None
    base = tensor._base
    if (
        base is None
        or not base.requires_grad
        or base.numel() != tensor.numel()
        or base.storage_offset() != tensor.storage_offset()
        or not base.is_contiguous()
        or not tensor.is_contiguous()
        or any(base is output for output in outputs)
    ):
        return None
    return get_gradient_edge(base)
