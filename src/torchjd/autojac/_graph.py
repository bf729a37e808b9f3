"""Discovery of the leaf tensors an output depends on, by walking the autograd graph."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from torch import Tensor
from torch.autograd.graph import Node


def find_leaves(roots: Sequence[Tensor], excluded: Iterable[Tensor] = ()) -> list[Tensor]:
    """Return the leaf tensors requiring grad that ``roots`` depend on, in breadth-first order.

    The walk starts from the ``grad_fn`` of each root (in order), follows ``next_functions`` in
    order, visits each node once and never enters the ``grad_fn`` of an ``excluded`` tensor (so
    what is only reachable through them is not found). It is iterative: graphs of any depth work.

    :param roots: The tensors whose graphs are walked; each must have a ``grad_fn``.
    :param excluded: Tensors whose ``grad_fn`` nodes are not entered; each must have a
        ``grad_fn``.
    """
    if any(root.grad_fn is None for root in roots):
        raise ValueError("All `tensors` should have a `grad_fn`.")
    excluded_nodes: set[Node] = set()
    for tensor in excluded:
        node = tensor.grad_fn
        if node is None:
            raise ValueError("All `excluded` tensors should have a `grad_fn`.")
        excluded_nodes.add(node)

    # Nodes are Python wrappers cached by their C++ node, so they hash and compare by identity.
    visited = set(excluded_nodes)
    queue: deque[Node] = deque()
    for root in roots:
        node = root.grad_fn
        if node is not None and node not in visited:
            visited.add(node)
            queue.append(node)

    leaves: dict[Tensor, None] = {}
    while queue:
        node = queue.popleft()
        if type(node).__name__ == "AccumulateGrad":
            leaves[node.variable] = None  # type: ignore[attr-defined]
        for next_node, _ in node.next_functions:
            if next_node is not None and next_node not in visited:
                visited.add(next_node)
                queue.append(next_node)
    return list(leaves)
