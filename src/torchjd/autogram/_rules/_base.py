"""The contract between the autogram engine and its per-layer Gramian rules.

Every hooked forward call of a module is recorded as a :class:`Call`: references to what the
module received and returned (never copies) and, once the engine has run its backward pass, the
gradients of the outputs. A :class:`GramianRule` turns the calls of one module into the rows of the
Jacobian restricted to that module's parameters, or directly into their Gramian or their weighted
sum, without re-running the module's forward.

Shapes. Let ``B`` be the batch size (dim 0 of every tensor input and output of the module, unless
the rule's :meth:`GramianRule.sample_axes` says otherwise for an output) and
``K`` the number of seeds of the engine's backward pass: every ``grad_outputs[j]`` has shape
``[K, *outputs[j].shape]``. In *batched* mode (``batch_dim`` set) the Jacobian has ``R = K * B``
rows, row ``k * B + i`` being the gradient coming from sample ``i`` under seed ``k`` (sample ``i``
of ``grad_outputs[j][k]``, by batch independence). In *summed* mode (``batch_dim=None``) there are
``R = K`` rows, row ``k`` summing the contributions of every sample under seed ``k``. A module
called several times has one :class:`Call` per use; its rows are the sums over the uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge


@dataclass(eq=False)
class Call:
    """One forward call of a hooked module, and the gradients of its outputs.

    :param args: The positional arguments of the call, as given.
    :param kwargs: The keyword arguments of the call, as given.
    :param outputs: The output tensors of the call, in pytree-flattened order. The engine does not
        keep outputs alive: one freed after the forward pass is given as a stand-in on the
        ``meta`` device with its shape, dtype and ``requires_grad`` (rules never read the values
        of the outputs).
    :param grad_outputs: For each output, its gradients ``[K, *output.shape]``, or ``None`` when
        the output does not reach the differentiated tensor. Filled by the engine's backward.
    :param output_edges: For each output, its gradient edge taken when the call returned (``None``
        for an output that does not require grad), or empty when unknown. Differentiate through
        these rather than through ``outputs``: an output modified in place afterwards (e.g. by
        ``ReLU(inplace=True)``) has a new ``grad_fn``, but its edge still points at the module's
        own graph. For the same reason, rules should read values from the inputs, not the outputs.
    :param internal_edges: Gradient edges inside the module's own graph, by name, set by the rule's
        :meth:`GramianRule.read_graph` before the engine's backward pass.
    :param internal_grads: The gradients ``[K, ...]`` that the engine's backward pass found at
        ``internal_edges`` (``None`` for an edge not reached), by the same names.
    :param saved: Tensors that autograd saved in the module's own graph, taken by
        :meth:`GramianRule.read_graph` before the backward pass frees them.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: tuple[Tensor, ...]
    grad_outputs: list[Tensor | None] = field(default_factory=list)
    output_edges: tuple[GradientEdge | None, ...] = ()
    internal_edges: dict[str, GradientEdge] = field(default_factory=dict)
    internal_grads: dict[str, Tensor | None] = field(default_factory=dict)
    saved: dict[str, Tensor] = field(default_factory=dict)


class GramianRule(ABC):
    """How to get the Jacobian rows of one module type's parameters from its calls.

    Subclasses implement :meth:`per_row_gradients`; they override :meth:`gramian` and
    :meth:`weighted_gradients` when a cheaper exact form exists (e.g. the "ghost" products of a
    Linear layer). ``params`` always names trainable parameters covered by the rule (see
    :meth:`covered_parameters`), in the order in which the Jacobian's columns are laid out.
    """

    def check(self, module: nn.Module, batched: bool) -> None:  # noqa: B027
        """Raise a :class:`ValueError` saying what to change if ``module`` is not supported.

        :param batched: Whether the engine uses per-sample structure (``batch_dim`` set).
        """

    def covered_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters whose Jacobian columns this rule computes, by name.

        By default the module's direct parameters; a rule may cover its children's parameters
        too (e.g. ``MultiheadAttention`` uses ``out_proj.weight`` without calling ``out_proj``).
        """
        return dict(module.named_parameters(recurse=False))

    @abstractmethod
    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        """Return, for each name in ``params``, the Jacobian rows ``[R, *param.shape]``."""

    def gramian(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> Tensor:
        """Return the ``[R, R]`` Gramian of the rows restricted to ``params``.

        The result must be a new tensor: the engine sums the blocks of the rules in place.
        """
        rows = self.per_row_gradients(module, calls, params, batched)
        gramian: Tensor | None = None
        for row in rows.values():
            flat = row.reshape(row.shape[0], -1)
            term = flat @ flat.T
            gramian = term if gramian is None else gramian + term
        if gramian is None:
            raise ValueError("`params` should name at least one parameter.")
        return gramian

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        """Return, for each name in ``params``, ``Σ_r weights[r] * row_r`` (shape of the param).

        :param weights: One weight per row, ``[R]``.
        """
        rows = self.per_row_gradients(module, calls, params, batched)
        return {name: torch.tensordot(weights, row, dims=1) for name, row in rows.items()}

    def gramian_then_weighted_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
        """Return the Gramian (as :meth:`gramian`) and a function of the weights ``[R]`` that
        returns the weighted gradients (as :meth:`weighted_gradients`).

        The fused step of the engine calls this: the weights depend on the Gramian of every
        module, so they are only known once all Gramians are computed. A rule may override it to
        reuse, for the weighted gradients, what the Gramian computed (e.g. materialised rows).
        The function is called at most once, after the engine has dropped its own references to
        the calls' arguments and output gradients: it must hold what it needs (and may free it
        as it goes).
        """
        gramian = self.gramian(module, calls, params, batched)
        return gramian, self.weighted_later(module, calls, params, batched)

    def weighted_later(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> Callable[[Tensor], dict[str, Tensor]]:
        """The function of the weights that :meth:`gramian_then_weighted_gradients` returns when
        nothing of the Gramian is reused: :meth:`weighted_gradients` on copies of the calls
        (which the engine empties before calling it), freed once used."""
        held = [
            Call(call.args, call.kwargs, call.outputs, list(call.grad_outputs), call.output_edges)
            for call in calls
        ]

        def weighted(weights: Tensor) -> dict[str, Tensor]:
            result = self.weighted_gradients(module, held, params, batched, weights)
            held.clear()
            return result

        return weighted

    def add_gramian_then_weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        gramian: Tensor,
    ) -> Callable[[Tensor], dict[str, Tensor]]:
        """As :meth:`gramian_then_weighted_gradients`, adding the Gramian into ``gramian``.

        :param gramian: The ``[R, R]`` sum of the blocks of the modules before, in the engine's
            accumulation dtype, to add this block to in place. A rule may override this method to
            add its products there directly, without a block of the Gramian's size.
        """
        block, weighted = self.gramian_then_weighted_gradients(module, calls, params, batched)
        check_block(block, gramian.shape[0], module)
        gramian.add_(block)
        return weighted

    def read_graph(self, module: nn.Module, call: Call) -> None:  # noqa: B027
        """Take from the graph that ``call`` recorded what the rule needs, before the backward pass.

        Called by the engine once per call, before its backward pass (which may free the graph).
        A rule may set ``call.internal_edges`` (the engine's backward pass then also fills
        ``call.internal_grads``: the gradients inside the module, at no extra cost, instead of
        recomputing the module's internals) and ``call.saved``. Rules must still work on calls
        where nothing was found (the default: nothing is read).
        """

    def sample_axes(self, module: nn.Module, call: Call) -> Sequence[int]:
        """The dim of each output of ``call`` (in ``call.outputs``' order) that indexes the samples.

        Used in batched mode only. By default every output has its samples on dim 0; a rule
        overrides it for modules laying some outputs out otherwise (the final hidden states of an
        RNN have theirs on dim 1).
        """
        return [0] * len(call.outputs)

    def needs_graph(self, module: nn.Module) -> bool:
        """Whether the rule differentiates through the graph that the calls recorded.

        Rules reading only the calls' arguments and output gradients return ``False``: the fused
        step may then free the graph during its backward pass, as an ordinary backward does.
        """
        return True


def check_block(block: Tensor, num_rows: int, module: nn.Module) -> None:
    """Raise if a rule returned a Gramian block of the wrong shape (a bug in the rule)."""
    if block.shape != (num_rows, num_rows):
        raise RuntimeError(
            f"The Gramian rule of {type(module)} returned a block of shape {tuple(block.shape)}; "
            f"expected ({num_rows}, {num_rows}). This is a bug in the rule."
        )
