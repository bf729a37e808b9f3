"""Structural checks of the autograd graph between ``output`` and the recorded calls.

One breadth-first walk from ``output``'s ``grad_fn`` over ``next_functions``. The walk keeps the
stack of recorded calls it is inside: reaching the node of a call's output enters the call, and
reaching the node of one of its tensor inputs leaves it. It refuses:

* an *uncovered use*: the ``AccumulateGrad`` node of a parameter of the engine's modules, reached
  while inside no call of a module covering that parameter (e.g. a parent module doing
  ``F.linear(x, self.child.weight)``). No rule saw that use, so its Jacobian columns would be
  silently wrong;
* with ``batch_dim`` set, a batch norm normalising with batch statistics (samples interact) on
  the way from ``output`` to a call: that call's per-sample output gradients would be wrong. (A
  batch norm inside a fallback-covered call, below nothing else recorded, is harmless: the
  fallback differentiates through the real graph);
* reentrant activation checkpointing (``use_reentrant=True``), whose backward node hides the
  parameters used inside it.

It also returns the *external leaves*: the tensors (parameters of other modules, inputs requiring
grad) whose ``.grad`` an ordinary ``output.backward(weights)`` would fill and that no rule covers,
for the weighted backward of the fused step.

Each node is visited once per (stack, taint) state, i.e. about once: the cost is linear in the size
of the graph, Python-side, without touching tensor values (no host synchronisation).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from torch import Tensor, nn
from torch.autograd.graph import Node

from ._recorder import Record


def check_graph(
    root: Node,
    records: Iterable[Record],
    covered_ids: Mapping[nn.Module, frozenset[int]],
    names: Mapping[int, str],
    batched: bool,
) -> list[Tensor]:
    """Walk the graph from ``root``, raise a :class:`ValueError` on what it refuses.

    :param records: The recorded calls (with their entry nodes); those whose outputs ``root``
        does not reach are never entered.
    :param covered_ids: For each hooked module, the ids of the parameters its rules cover.
    :param names: Readable names of the engine's parameters, by id.
    :param batched: Whether per-sample structure is used (``batch_dim`` set).
    :returns: The leaves reached from ``root`` that are not parameters of the engine's modules.
    """
    entered_at: dict[Node, list[Record]] = {}
    for record in records:
        for node in record.entry_nodes:
            entered_at.setdefault(node, []).append(record)
    for at_node in entered_at.values():
        # Outer calls (which return last) are entered first.
        at_node.sort(key=lambda record: record.order, reverse=True)

    start: tuple[Node, tuple[Record, ...], bool] = (root, (), False)
    seen = {start}
    queue = deque([start])
    external: dict[int, Tensor] = {}
    while queue:
        node, stack, tainted = queue.popleft()
        while stack and node in stack[-1].input_nodes:
            stack = stack[:-1]
        for record in entered_at.get(node, ()):
            if node in record.input_nodes or record in stack:
                continue
            if tainted:
                raise ValueError(_batch_statistics_message(record))
            stack = (*stack, record)

        kind = type(node).__name__
        if kind == "AccumulateGrad":
            variable = node.variable  # type: ignore[attr-defined]
            param_id = id(variable)
            if param_id not in names:
                external[param_id] = variable
            elif not any(
                param_id in covered_ids.get(record.module, frozenset()) for record in stack
            ):
                raise ValueError(_uncovered_message(names[param_id], stack))
            continue
        if kind == "CheckpointFunctionBackward":
            raise ValueError(
                "Found reentrant activation checkpointing (`torch.utils.checkpoint.checkpoint` "
                "with `use_reentrant=True`) between `output` and the engine's modules: it hides "
                "the parameters used inside it from the engine. Use `use_reentrant=False`."
            )
        next_tainted = tainted or (batched and "BatchNorm" in kind and _mixes_samples(node, kind))
        for next_node, _ in node.next_functions:
            if next_node is None:
                continue
            state = (next_node, stack, next_tainted)
            if state not in seen:
                seen.add(state)
                queue.append(state)
    return list(external.values())


def _mixes_samples(node: Node, kind: str) -> bool:
    """Whether ``node`` is a batch norm computing statistics over more than one sample."""
    if "BatchNorm" not in kind or "NoUpdate" in kind or "NoTraining" in kind:
        return False
    training = getattr(node, "_saved_training", getattr(node, "_saved_train", True))
    if training is False:
        return False
    # InstanceNorm runs a batch norm on a [1, B * C, ...] view: one "sample", no mixing.
    try:
        saved_input = node._saved_input  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return True
    return not isinstance(saved_input, Tensor) or saved_input.ndim == 0 or saved_input.shape[0] != 1


def _batch_statistics_message(record: Record) -> str:
    return (
        "Found a batch norm using batch statistics (a BatchNorm module in training mode, or with "
        "`track_running_stats=False`) between `output` and a call of a module of type "
        f"{type(record.module)} covered by the engine: samples interact, so per-sample gradients "
        "cannot be obtained from one backward pass with `batch_dim` set. Put the batch norm in "
        "eval mode, replace it by a per-sample normalisation (GroupNorm, LayerNorm, InstanceNorm), "
        "or use `batch_dim=None`."
    )


def _uncovered_message(name: str, stack: tuple[Record, ...]) -> str:
    where = (
        f"inside a call of a module of type {type(stack[-1].module)} that does not cover it"
        if stack
        else "outside any call of the module that owns it"
    )
    return (
        f"The parameter `{name}` of the engine's modules is used {where} (e.g. a parent module "
        "doing `F.linear(x, self.child.weight)` instead of calling `self.child(x)`). The engine "
        "computes each parameter's Jacobian columns from the calls of the module that owns it, so "
        "this use would be missed. Call the module that owns the parameter instead of using the "
        "parameter directly, or move the parameter into the module that uses it."
    )
