"""The autogram engine: Gramians of Jacobians from one backward pass and per-layer closed forms."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.utils.hooks import RemovableHandle

from torchjd.aggregation._utils import PSDMatrix
from torchjd.aggregation._weighting_bases import GeneralizedWeighting, Weighting

from ._coverage import Coverage, plan_coverage
from ._gramian_layout import (
    Seeding,
    make_seeding,
    normalize_batch_dim,
    to_generalized_gramian,
    to_row_weights,
)
from ._graph_checks import check_graph
from ._recorder import Record, Recorder
from ._rules import Call
from ._rules._base import GramianRule, check_block
from ._rules._fallback import FALLBACK_RULE


class Engine:
    r"""Computes the Gramian of the Jacobian of a tensor w.r.t. the parameters of some modules.

    The engine hooks the given modules once, at construction. After a forward pass, with gradients
    enabled, that produces a tensor ``output`` (e.g. one loss per sample),
    :meth:`compute_gramian` returns the Gramian :math:`J J^\top` of the Jacobian :math:`J` of
    ``output`` w.r.t. the trainable parameters of these modules, without ever holding :math:`J`:
    one backward pass gives every hooked call's output gradients, and per-layer rules turn them
    into Gramian blocks (closed forms for common layers, exact vector-Jacobian products for any
    other module). A weighting of the Gramian then gives weights, and ``output.backward(weights)``
    performs the Jacobian descent step. :meth:`backward` does all of this in one call, with one
    backward pass instead of two (the fused step).

    >>> import torch
    >>> from torch.nn import Linear, MSELoss, ReLU, Sequential
    >>> from torch.optim import SGD
    >>> from torchjd.aggregation import UPGradWeighting
    >>> from torchjd.autogram import Engine
    >>>
    >>> model = Sequential(Linear(5, 4), ReLU(), Linear(4, 1))
    >>> optimizer = SGD(model.parameters(), lr=0.1)
    >>> criterion = MSELoss(reduction="none")
    >>> weighting = UPGradWeighting()
    >>> engine = Engine(model, batch_dim=0)
    >>>
    >>> inputs = torch.randn(8, 16, 5)  # 8 batches of 16 samples
    >>> targets = torch.randn(8, 16)
    >>> for x, y in zip(inputs, targets):
    ...     output = model(x).squeeze(dim=1)  # [16]
    ...     losses = criterion(output, y)  # [16]
    ...     gramian = engine.compute_gramian(losses)  # [16, 16]
    ...     weights = weighting(gramian)  # [16]
    ...     optimizer.zero_grad()
    ...     losses.backward(weights)
    ...     optimizer.step()

    **Which parameters.** Every trainable parameter of the given modules (and of their
    descendants) at construction time. Parameters elsewhere are not part of the Gramian (partial
    Jacobian descent), but ``output.backward(weights)`` still fills their ``.grad``. A parameter
    must be used through calls of the module that owns it (or of a module whose rule covers it, e.g.
    ``MultiheadAttention`` for ``out_proj.weight``): a use outside those calls (a parent doing
    ``F.linear(x, self.child.weight)``) raises a :class:`ValueError` instead of giving a wrong
    Gramian. Modules may be called several times, share parameters, and take and return any
    pytree of tensors and other values.

    **Shapes.** For ``output`` of shape ``[m_1, ..., m_k]``, the result has shape
    ``[m_1, ..., m_k, m_k, ..., m_1]``: the entry at ``[i_1, ..., i_k, j_k, ..., j_1]`` is the inner
    product of the gradients of ``output[i_1, ..., i_k]`` and ``output[j_1, ..., j_k]``. Use
    :class:`torchjd.aggregation.Flattening` to get weights of ``output``'s shape from it.

    **batch_dim.** With an index, the engine uses the per-sample structure of the model: each
    hooked module must treat the samples independently and have every tensor input and output
    batched along dim 0 (``batch_first=True``), whatever the position of the batch in ``output``.
    Cases where samples interact are refused with a :class:`ValueError`: batch norms normalising
    with batch statistics (training mode, or ``track_running_stats=False``) among or after the
    hooked modules, and hooked calls whose outputs are not batched on dim 0. Interactions that the
    engine cannot see (e.g. a loss comparing samples) are the user's responsibility. With ``None``,
    no such assumption is made (each entry of ``output`` gets a full backward pass' worth of
    output gradients): exact for any model, batch norms in training mode included, but the cost
    grows with the number of entries of ``output``.

    The forward passes of the modules are never re-run: randomness (dropout), side effects and
    in-place operations are those of the real forward pass. Exactly one :meth:`compute_gramian`
    should follow each forward pass with gradients enabled: the engine keeps references to the
    recorded calls (the activations autograd already saves) until the next :meth:`compute_gramian`
    (use ``torch.no_grad()`` for evaluation passes). Calls that do not lead to ``output`` are
    ignored. The hooks are removed when the engine is garbage-collected.

    :param modules: The modules whose trainable parameters define the columns of the Jacobian.
    :param batch_dim: The batch dimension of the tensors later given to :meth:`compute_gramian`
        (negative values count from the end), or ``None`` to not use per-sample structure.
    """

    def __init__(self, *modules: nn.Module, batch_dim: int | None) -> None:
        for index, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"Expected every element of `modules` to be a torch.nn.Module; found "
                    f"{type(module)} at position {index}."
                )
        if batch_dim is not None and (
            not isinstance(batch_dim, int) or isinstance(batch_dim, bool)
        ):
            raise TypeError(f"Expected `batch_dim` to be an int or None; found {batch_dim!r}.")
        self._batch_dim = batch_dim
        self._coverage: Coverage = plan_coverage(modules, batched=batch_dim is not None)
        self._covered_ids = {
            module: self._coverage.covered_ids(module) for module in self._coverage.assignments
        }
        self._recorder = Recorder()
        # Marks the graphs already differentiated, in their root node (no reference to the graph).
        self._marker_key = f"torchjd.autogram.Engine.{id(self._recorder)}"
        handles = [
            module.register_forward_hook(self._recorder.hook, with_kwargs=True, prepend=True)
            for module in self._coverage.assignments
        ]
        # The hooks only hold the recorder, so the engine can be collected, which removes them.
        weakref.finalize(self, _remove_hooks, handles)

    def _graph_readers(self, module: nn.Module) -> list[GramianRule]:
        """The rules of ``module`` (its own, not the fallback) that may read its calls' graphs."""
        rules: list[GramianRule] = []
        for assignment in self._coverage.assignments.get(module, ()):
            if assignment.rule is not FALLBACK_RULE and assignment.rule not in rules:
                rules.append(assignment.rule)
        return rules

    def compute_gramian(self, output: Tensor) -> Tensor:
        """Return the generalized Gramian of the Jacobian of ``output`` w.r.t. the parameters.

        Runs one backward pass from ``output`` (keeping its graph, so that
        ``output.backward(weights)`` works afterwards), then combines the per-layer blocks.

        :param output: A tensor computed, with gradients enabled, by the forward pass that
            followed the previous call to this method.
        :returns: A tensor of shape ``[*output.shape, *reversed(output.shape)]`` and of
            ``output``'s dtype.
        :raises IndexError: If ``batch_dim`` is not ``None`` and is not a dimension of ``output``.
        :raises RuntimeError: If ``output`` does not require grad, if no forward pass happened since
            the last call, or if ``output`` does not depend on any call of the hooked modules.
        :raises ValueError: If the engine cannot compute the Gramian exactly for this graph (see
            the class description).
        """
        try:
            differentiation = self._differentiate(output, retain_graph=True)
            with torch.no_grad():
                gramian = self._gramian(differentiation)
            seeding = differentiation.seeding
            return to_generalized_gramian(_cast(gramian, differentiation.dtype), seeding)
        finally:
            self._recorder.paused = False
            self._recorder.take()

    def backward(
        self,
        output: Tensor,
        weighting: Weighting[PSDMatrix] | GeneralizedWeighting,
        *,
        retain_graph: bool = False,
    ) -> Tensor:
        r"""Perform the Jacobian descent step of ``output``: Gramian, weights and ``.grad``.

        Fills the ``.grad`` field of every tensor that ``output.backward(weights)`` would fill
        (accumulating into existing gradients), where ``weights = weighting(gramian)`` and
        ``gramian`` is what :meth:`compute_gramian` would return, with a single backward pass
        instead of two: the gradients of the engine's parameters come from the same per-layer
        quantities as the Gramian. Parameters outside the engine's modules (partial Jacobian
        descent) get theirs from an ordinary backward weighted by ``weights``, restricted to them.

        >>> import torch
        >>> from torch.nn import Linear, MSELoss, ReLU, Sequential
        >>> from torchjd.aggregation import MeanWeighting
        >>> from torchjd.autogram import Engine
        >>>
        >>> model = Sequential(Linear(5, 4), ReLU(), Linear(4, 1))
        >>> engine = Engine(model, batch_dim=0)
        >>> criterion = MSELoss(reduction="none")
        >>> losses = criterion(model(torch.randn(16, 5)).squeeze(1), torch.randn(16))
        >>> weights = engine.backward(losses, MeanWeighting())  # fills .grad, like losses.mean()
        >>> weights.shape
        torch.Size([16])

        Hooks registered on the parameters (``register_hook``,
        ``register_post_accumulate_grad_hook``) run as in an ordinary backward pass.

        :param output: A tensor computed, with gradients enabled, by the forward pass that
            followed the previous call to the engine.
        :param weighting: For a vector ``output``, a :class:`~torchjd.aggregation.Weighting` of
            Gramians (e.g. :class:`~torchjd.aggregation.UPGradWeighting`); for any shape, a
            :class:`~torchjd.aggregation.GeneralizedWeighting` (e.g.
            :class:`~torchjd.aggregation.Flattening`) of generalized Gramians.
        :param retain_graph: Whether to keep the graph of ``output`` (as in
            ``output.backward(weights, retain_graph=...)``). When it is not kept, the graph is
            freed where the backward pass allows it.
        :returns: The weights, of the shape of ``output``.
        :raises TypeError: If ``weighting`` does not fit ``output`` (a
            :class:`~torchjd.aggregation.Weighting` for an output that is not a vector).
        :raises ValueError: If the weights do not have the shape of ``output``, and in the cases
            of :meth:`compute_gramian`.
        """
        _check_weighting(output, weighting)
        if not isinstance(retain_graph, bool):
            raise TypeError(f"Expected `retain_graph` to be a bool; found {retain_graph!r}.")
        try:
            differentiation = self._differentiate(output, retain_graph=retain_graph, fused=True)
            with torch.no_grad():
                gramian, steps = self._fused_gramian(differentiation)
            seeding = differentiation.seeding
            gramian = _cast(gramian, differentiation.dtype)
            generalized_gramian = to_generalized_gramian(gramian, seeding)
            del gramian  # before the weighting runs: its layout may be a copy
            weights = weighting(generalized_gramian)
            del generalized_gramian
            _check_weights(weights, output)
            with torch.no_grad():
                self._write_gradients(steps, to_row_weights(weights.detach(), seeding))
            if differentiation.external:
                torch.autograd.backward(
                    output,
                    _cast(weights.detach(), output.dtype),
                    retain_graph=retain_graph,
                    inputs=differentiation.external,
                )
            return weights
        finally:
            self._recorder.paused = False
            self._recorder.take()

    def _differentiate(
        self, output: Tensor, retain_graph: bool, fused: bool = False
    ) -> _Differentiation:
        """Run the backward pass giving every reachable call its output gradients, and check."""
        if not isinstance(output, Tensor):
            raise TypeError(f"Expected `output` to be a Tensor; found {type(output)}.")
        batch_dim = normalize_batch_dim(output, self._batch_dim)
        if not output.requires_grad or output.grad_fn is None:
            raise RuntimeError(
                "Expected `output` to be the result of a differentiable computation (to require "
                "grad and have a grad_fn); found a tensor that does not. Was it detached, or "
                "computed under `torch.no_grad()`?"
            )
        root = output.grad_fn
        assert root is not None
        # Typed as a method in torch's stubs; a dict property at runtime.
        metadata = cast(dict[str, bool], root.metadata)
        if metadata.get(self._marker_key, False):
            raise RuntimeError(
                "`compute_gramian` was already called on this output, and the calls recorded "
                "during its forward pass were used then: run a new forward pass."
            )
        metadata[self._marker_key] = True
        records = self._recorder.take()
        seeding = make_seeding(output, batch_dim)
        batched = batch_dim is not None
        self._recorder.paused = True
        targets = _targets(records, self._graph_readers)
        # Before the backward pass, from the structure of the graph alone: a parameter used outside
        # the calls that cover it may be the very reason why no call is reached. Without any record
        # (e.g. a graph already used by a previous `compute_gramian`), every use would look
        # uncovered: only the rest is checked.
        external = check_graph(
            root,
            records,
            self._covered_ids,
            self._coverage.names if records else {},
            batched,
        )
        if not records:
            raise RuntimeError(
                "No call of the engine's modules was recorded since the last `compute_gramian`: "
                "run a forward pass with gradients enabled before each `compute_gramian`, in "
                "which the modules are called (not only their parameters used)."
            )
        # The graph is kept when something differentiates through it later, and when a batched
        # (vmap) pass may fail half-way and be retried seed by seed.
        keep = (
            retain_graph
            or not fused
            or bool(external)
            or seeding.seeds is not None
            or any(
                assignment.rule.needs_graph(record.module)
                for record in records
                for assignment in self._coverage.assignments[record.module]
            )
        )
        _backward_to_calls(output, targets, seeding, keep)
        reached = [record for record in records if record.has_gradient()]
        if not any(
            param.requires_grad
            for record in reached
            for assignment in self._coverage.assignments[record.module]
            for param in assignment.params.values()
        ):
            raise RuntimeError(
                "Expected `output` to depend on the trainable parameters of the engine's modules "
                "through calls recorded since the last `compute_gramian`; found no such call."
            )
        for record in reached:
            self._check_record(record, seeding, batched)
        calls_by_module: dict[nn.Module, list[Call]] = {}
        for record in reached:
            calls_by_module.setdefault(record.module, []).append(record.call)
        return _Differentiation(seeding, batched, calls_by_module, output.dtype, external)

    def _check_record(self, record: Record, seeding: Seeding, batched: bool) -> None:
        module = record.module
        for tensor, version in record.input_versions:
            if tensor._version != version and _reads_inputs(self._coverage, module):
                raise ValueError(
                    f"An input of a call of a module of type {type(module)} was modified in place "
                    "after the call: the engine reads the inputs that the module received. Avoid "
                    "the in-place operation (e.g. use `ReLU(inplace=False)`)."
                )
        if not batched:
            return
        if record.uses_batch_statistics:
            raise ValueError(
                f"Found a call of a module of type {type(module)} normalising with the statistics "
                "of the batch (training mode): samples are not independent, so the engine cannot "
                "use per-sample structure with `batch_dim` set. Put it in eval mode, use a "
                "per-sample normalisation (GroupNorm, LayerNorm, InstanceNorm), or use "
                "`batch_dim=None`."
            )
        batch_size = seeding.batch_size
        call = record.call
        axes = _sample_axes(self._coverage, module, call)
        for tensor, grad, axis in zip(call.outputs, call.grad_outputs, axes):
            if grad is not None and (tensor.ndim <= axis or tensor.shape[axis] != batch_size):
                raise ValueError(
                    f"Expected every output of the calls of the engine's modules to be batched on "
                    f"dim {axis} (size {batch_size}, the size of `output` along `batch_dim`) when "
                    f"`batch_dim` is not None; found an output of shape {tuple(tensor.shape)} in "
                    f"a call of a module of type {type(module)}. Use `batch_first=True` layouts, "
                    "or `batch_dim=None`."
                )

    def _gramian(self, differentiation: _Differentiation) -> Tensor:
        """The ``[R, R]`` Gramian, in the accumulation dtype; the calls' gradients are dropped."""
        gramian, _ = self._blocks(differentiation, fused=False)
        return gramian

    def _fused_gramian(self, differentiation: _Differentiation) -> tuple[Tensor, _GradientSteps]:
        """The ``[R, R]`` Gramian, and what gives the gradients once the weights are known."""
        return self._blocks(differentiation, fused=True)

    def _blocks(
        self, differentiation: _Differentiation, fused: bool
    ) -> tuple[Tensor, _GradientSteps]:
        seeding, batched = differentiation.seeding, differentiation.batched
        num_rows = seeding.num_rows
        accumulation_dtype = torch.promote_types(differentiation.dtype, torch.float32)
        gramian: Tensor | None = None
        steps = _GradientSteps()
        shared_rows: dict[int, tuple[nn.Parameter, Tensor]] = {}
        calls_by_module = differentiation.calls_by_module
        forward_order = {module: index for index, module in enumerate(calls_by_module)}
        for module in sorted(calls_by_module, key=self._parameter_count):
            calls = calls_by_module.pop(module)
            module_steps: list[_WeightedGradients] = []
            for assignment in self._coverage.assignments[module]:
                own: list[str] = []
                shared: list[str] = []
                for name, param in assignment.params.items():
                    if param.requires_grad:
                        (shared if id(param) in self._coverage.shared else own).append(name)
                if own:
                    rule = assignment.rule
                    if fused and gramian is not None:
                        # The rule adds its block in place (some without a block of this size).
                        weighted = rule.add_gramian_then_weighted_gradients(
                            module, calls, own, batched, gramian
                        )
                        module_steps.append((weighted, assignment.params))
                    else:
                        if fused:
                            block, weighted = rule.gramian_then_weighted_gradients(
                                module, calls, own, batched
                            )
                            module_steps.append((weighted, assignment.params))
                        else:
                            block = rule.gramian(module, calls, own, batched)
                        check_block(block, num_rows, module)
                        # Blocks are new tensors, of the size of the Gramian: summed in place.
                        block = _cast(block, accumulation_dtype)
                        gramian = block if gramian is None else gramian.add_(block)
                        del block
                if shared:
                    rows = assignment.rule.per_row_gradients(module, calls, shared, batched)
                    for name in shared:
                        param = assignment.params[name]
                        row = _cast(rows[name], accumulation_dtype)
                        if id(param) in shared_rows:
                            row = shared_rows[id(param)][1] + row
                        shared_rows[id(param)] = (param, row)
            if module_steps:
                steps.modules.append((forward_order[module], module_steps))
            # What the calls of a module hold is needed by its own blocks only; the functions of
            # the fused step hold what they need (rows, for some rules, are smaller than the
            # inputs and output gradients, which can then be freed before the weights are known).
            _release(calls)
        for param, summed_rows in shared_rows.values():
            flat = summed_rows.reshape(num_rows, -1)
            gramian = flat @ flat.T if gramian is None else gramian.addmm_(flat, flat.T)
            steps.shared.append((param, summed_rows))
        assert gramian is not None
        return gramian, steps

    def _parameter_count(self, module: nn.Module) -> int:
        """The order of the modules' blocks: the fewest parameters first.

        Until the weights are known, the fused step holds, for each module, its inputs and output
        gradients or what its rules keep instead (e.g. rows, ``R`` per parameter). Modules with
        few parameters (norms) free their inputs and output gradients for small rows: done first,
        they lower the memory held while the larger modules build their rows.
        """
        return sum(
            param.numel()
            for assignment in self._coverage.assignments[module]
            for param in assignment.params.values()
        )

    def _write_gradients(self, steps: _GradientSteps, weights: Tensor) -> None:
        """Accumulate each gradient into ``.grad``, module by module, freeing what was used.

        The last modules of the forward pass come first, as in a backward pass: their inputs are
        usually the largest activations, and their parameters not the largest.
        """
        steps.modules.sort(key=lambda module: module[0])
        while steps.modules:
            # The steps hold what they need (the calls were released when the blocks were
            # formed), and free it as they go.
            _, module_steps = steps.modules.pop()
            grads: dict[Tensor, Tensor] = {}
            while module_steps:
                weighted_gradients, params = module_steps.pop()
                for name, grad in weighted_gradients(weights).items():
                    grads[params[name]] = grad
                del weighted_gradients
            _accumulate_grads(grads)
        grads = {}
        for param, summed_rows in steps.shared:
            grad = torch.tensordot(_cast(weights, summed_rows.dtype), summed_rows, dims=1)
            grads[param] = _cast(grad, param.dtype)
        steps.shared.clear()
        _accumulate_grads(grads)


_WeightedGradients = tuple[Callable[[Tensor], dict[str, Tensor]], dict[str, nn.Parameter]]


@dataclass(eq=False)
class _GradientSteps:
    """What gives the gradients of the fused step, once the weights are known.

    :param modules: For each module, its position in the forward pass and, for each of its rules,
        the function of the weights giving the gradients (by name) and the parameters (by
        name).
    :param shared: Each parameter covered by several modules, with its summed rows.
    """

    modules: list[tuple[int, list[_WeightedGradients]]] = field(default_factory=list)
    shared: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)


def _release(calls: Sequence[Call]) -> None:
    """Drop the references of ``calls`` to their arguments, outputs and output gradients.

    The outputs that were still alive when the backward pass started (e.g. a norm's output, which
    the next layer's call holds) are replaced by stand-ins on the ``meta`` device, so that they
    are freed with the last call that reads them.
    """
    for call in calls:
        call.grad_outputs = [None] * len(call.grad_outputs)
        call.args = ()
        call.kwargs = {}
        call.outputs = tuple(_stand_in(output) for output in call.outputs)
        call.internal_edges = {}
        call.internal_grads = {}
        call.saved = {}


@dataclass(eq=False)
class _Differentiation:
    """What one backward pass produced: each reachable call with its output gradients.

    :param external: The leaves that ``output`` depends on outside the engine's parameters.
    """

    seeding: Seeding
    batched: bool
    calls_by_module: dict[nn.Module, list[Call]]
    dtype: torch.dtype
    external: list[Tensor]


def _stand_in(tensor: Tensor) -> Tensor:
    if tensor.device.type == "meta":
        return tensor
    stand_in = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return stand_in.requires_grad_() if tensor.requires_grad else stand_in


def _remove_hooks(handles: Sequence[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def _sample_axes(coverage: Coverage, module: nn.Module, call: Call) -> Sequence[int]:
    """Where the module's own rule (not the fallback of its remaining parameters) puts samples."""
    assignments = coverage.assignments.get(module, ())
    rule = next((a.rule for a in assignments if a.rule is not FALLBACK_RULE), FALLBACK_RULE)
    return rule.sample_axes(module, call)


def _reads_inputs(coverage: Coverage, module: nn.Module) -> bool:
    return any(a.rule is not FALLBACK_RULE for a in coverage.assignments.get(module, ()))


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    # `Tensor.to` costs a dispatch even when it has nothing to do.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _check_weighting(output: Tensor, weighting: object) -> None:
    if isinstance(weighting, GeneralizedWeighting):
        return
    if not isinstance(weighting, Weighting):
        raise TypeError(
            "Expected `weighting` to be a torchjd.aggregation.Weighting (for a vector `output`) or "
            f"a torchjd.aggregation.GeneralizedWeighting; found {type(weighting)}."
        )
    if isinstance(output, Tensor) and output.ndim != 1:
        raise TypeError(
            f"Expected a GeneralizedWeighting for an `output` of shape {tuple(output.shape)}, "
            "whose Gramian is a generalized Gramian; found a Weighting, which takes the Gramian "
            "of a vector. Wrap it: `Flattening(weighting)`."
        )


def _check_weights(weights: object, output: Tensor) -> None:
    if not isinstance(weights, Tensor):
        raise TypeError(f"Expected the weighting to return a Tensor; found {type(weights)}.")
    if weights.shape != output.shape or weights.device != output.device:
        raise ValueError(
            "Expected the weighting to return one weight per entry of `output`, of shape "
            f"{tuple(output.shape)} on {output.device}; found shape {tuple(weights.shape)} on "
            f"{weights.device}."
        )


def _accumulate_grads(grads: dict[Tensor, Tensor]) -> None:
    """Accumulate each gradient into its parameter's ``.grad``, as ``AccumulateGrad`` does.

    Directly when the parameter has no hooks: through autograd, a gradient held here would be
    copied (a fresh allocation of the size of the model, and its page faults, on every step).
    Parameters with hooks (``register_hook``, ``register_post_accumulate_grad_hook``) go through
    autograd, which runs them.
    """
    hooked_params: list[Tensor] = []
    hooked_grads: list[Tensor] = []
    for param, grad in grads.items():
        if grad.shape != param.shape or grad.dtype != param.dtype:
            raise RuntimeError(
                f"A rule returned a gradient of shape {tuple(grad.shape)} and dtype {grad.dtype} "
                f"for a parameter of shape {tuple(param.shape)} and dtype {param.dtype}. This is a "
                "bug in the rule."
            )
        if param._backward_hooks or param._post_accumulate_grad_hooks:
            hooked_params.append(param)
            hooked_grads.append(grad)
        elif param.grad is None:
            # The layout of the parameter, as autograd's "gradient layout contract" requires.
            if grad.layout == torch.strided and grad.stride() != param.stride():
                grad = torch.empty_like(param).copy_(grad)
            param.grad = grad
        elif grad.layout != torch.strided or param.grad.layout != torch.strided:
            param.grad = param.grad + grad  # sparse gradients (e.g. `Embedding(sparse=True)`)
        else:
            param.grad += grad
    if hooked_params:
        torch.autograd.backward(hooked_params, hooked_grads)


# A call's output (by index) or an edge inside its module (by name), the edge, and whether it
# was moved to the output's base.
_Target = tuple[Record, int | str, GradientEdge, bool]


def _targets(
    records: Sequence[Record], graph_readers: Callable[[nn.Module], Sequence[GramianRule]]
) -> list[_Target]:
    """The edges at which each call's output gradients are taken; sets ``entry_nodes``.

    The rules of each call may add edges inside the module (see :meth:`GramianRule.read_graph`).
    """
    targets: list[_Target] = []
    for record in records:
        for rule in graph_readers(record.module):
            rule.read_graph(record.module, record.call)
        targets.extend(
            (record, name, edge, False) for name, edge in record.call.internal_edges.items()
        )
        record.resolve_outputs()
        call = record.call
        call.grad_outputs = [None] * len(call.outputs)
        entry_nodes = set()
        seen_edges = set()
        for index, edge in enumerate(call.output_edges):
            # An output returned twice keeps a gradient only once, so that no rule counts it twice.
            if edge is None or (edge.node, edge.output_nr) in seen_edges:
                continue
            seen_edges.add((edge.node, edge.output_nr))
            # Only views are rewired by in-place operations; they are held strongly.
            tensor = record.output(index)
            from_base = (
                tensor is not None
                and tensor._is_view()
                and tensor._version != record.output_versions[index]
            )
            if from_base:
                base_edge = record.output_bases[index]
                if base_edge is None:
                    raise ValueError(
                        f"An output of a call of a module of type {type(record.module)} is a view "
                        "that was modified in place after the call, which hides the module's own "
                        "graph from the engine. Avoid the in-place operation (e.g. use "
                        "`ReLU(inplace=False)`)."
                    )
                edge = base_edge
            entry_nodes.add(edge.node)
            targets.append((record, index, edge, from_base))
        record.entry_nodes = frozenset(entry_nodes)
        record.release_views()
    return targets


def _backward_to_calls(
    output: Tensor, targets: Sequence[_Target], seeding: Seeding, retain_graph: bool
) -> None:
    """Fill ``grad_outputs`` of every call: ``[K, *out.shape]``, or ``None`` if not reached."""
    if not targets:
        return
    edges = [edge for _, _, edge, _ in targets]
    batched_grads: Sequence[Tensor | None]
    if seeding.seeds is None:
        grads = torch.autograd.grad(
            output,
            edges,
            grad_outputs=torch.ones_like(output),
            retain_graph=retain_graph,
            allow_unused=True,
        )
        batched_grads = [None if grad is None else grad.unsqueeze(0) for grad in grads]
    else:
        batched_grads = _batched_grad(output, edges, seeding.seeds)
    for (record, index, _, from_base), grad in zip(targets, batched_grads):
        if isinstance(index, str):
            record.call.internal_grads[index] = grad
            continue
        if grad is not None and from_base:
            grad = grad.reshape(grad.shape[0], *record.call.outputs[index].shape)
        record.call.grad_outputs[index] = grad


def _batched_grad(
    output: Tensor, edges: Sequence[GradientEdge], seeds: Tensor
) -> Sequence[Tensor | None]:
    try:
        return torch.autograd.grad(
            output,
            edges,
            grad_outputs=seeds,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except Exception:
        # Some backward formulas cannot be batched by vmap: one seed at a time (a genuine error is
        # raised again there).
        pass
    per_seed = [
        torch.autograd.grad(output, edges, grad_outputs=seed, retain_graph=True, allow_unused=True)
        for seed in seeds
    ]
    result: list[Tensor | None] = []
    for grads in zip(*per_seed):
        if any(grad is None for grad in grads):
            result.append(None)
        else:
            result.append(torch.stack([grad for grad in grads if grad is not None]))
    return result
