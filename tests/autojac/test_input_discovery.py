from __future__ import annotations

import pytest
import torch
from torch import nn

from torchjd.autojac._graph import find_leaves


def _same(found: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return len(found) == len(expected) and all(a is b for a, b in zip(found, expected))


def test_spec_order() -> None:
    p1 = torch.tensor([1.0, 2.0], requires_grad=True)
    p2 = torch.tensor([3.0, 4.0, 5.0], requires_grad=True)
    out = torch.stack([(p2**2).sum() + p1.sum(), (p1 * p2[:2]).sum()])
    assert _same(find_leaves([out]), [p1, p2])


def test_breadth_first_order_follows_next_functions() -> None:
    a, b, c = (torch.tensor(float(i), requires_grad=True) for i in range(3))
    deep = ((a * 2) * 3) * 4  # a is three levels below the root
    out = deep + (b + c)  # b, c are two levels below
    assert _same(find_leaves([out]), [b, c, a])
    assert _same(find_leaves([b * 1, out]), [b, c, a])


def test_only_leaves_requiring_grad() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    frozen = torch.tensor([1.0, 1.0])
    hidden = p * frozen
    hidden.retain_grad()
    assert _same(find_leaves([(hidden * 2).sum()]), [p])


def test_leaves_visited_once_across_roots() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    q = torch.tensor(3.0, requires_grad=True)
    y1 = (p * q).sum()
    y2 = p.sum() * 2
    assert _same(find_leaves([y1, y2, y1]), [p, q])


def test_model_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    found = find_leaves([model(torch.randn(5, 3)).sum()])
    assert {id(t) for t in found} == {id(p) for p in model.parameters()}
    # BFS from the output reaches the last layer first.
    assert found[0] is model[2].bias or found[0] is model[2].weight


def test_excluded_nodes_are_not_entered() -> None:
    shared = torch.tensor([1.0, 2.0], requires_grad=True)
    head = torch.tensor([3.0, 4.0], requires_grad=True)
    features = shared * 2
    loss = head @ features
    assert _same(find_leaves([loss], excluded=[features]), [head])
    # A path that bypasses the excluded node still reaches the leaf.
    assert _same(find_leaves([loss + shared.sum()], excluded=[features]), [head, shared])


def test_excluded_root_is_dropped() -> None:
    shared = torch.tensor([1.0, 2.0], requires_grad=True)
    features = shared * 2
    assert find_leaves([features], excluded=[features]) == []


def test_deep_graph() -> None:
    x = torch.tensor(1.0, requires_grad=True)
    y = torch.tensor(2.0, requires_grad=True)
    hidden = x
    for _ in range(10_000):
        hidden = hidden * 1.0
    assert _same(find_leaves([hidden * y]), [y, x])


def test_errors() -> None:
    leaf = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"^All `tensors` should have a `grad_fn`\.$"):
        find_leaves([leaf * 2, leaf])
    with pytest.raises(ValueError, match=r"^All `excluded` tensors should have a `grad_fn`\.$"):
        find_leaves([leaf * 2], excluded=[leaf])
