from __future__ import annotations

import pytest
import torch
from _autojac_utils import (
    AGGREGATOR_FACTORIES,
    SolveAggregator,
    recorded,
    reference_jacobian,
    split_like,
)
from torch import Tensor, nn
from torch.testing import assert_close

from torchjd.aggregation import Aggregator, Mean, Sum, UPGrad
from torchjd.autojac import mtl_backward

CHUNK_SIZES = [1, 2, 3, None]
THREE_TASK_NAMES = ["Mean", "Sum", "UPGrad", "MGDA", "IMTLG", "SolveAggregator", "ColumnMedian"]


def _three_tasks() -> tuple[Tensor, Tensor, list[Tensor], Tensor, list[Tensor]]:
    """``f = J @ p0`` and ``y_k = p_k @ f`` for k = 1, 2, 3."""
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(4, 5, generator=generator)
    p0 = torch.randn(5, generator=generator, requires_grad=True)
    heads = [torch.randn(4, generator=generator, requires_grad=True) for _ in range(3)]
    features = jacobian @ p0
    losses = [head @ features for head in heads]
    return jacobian, p0, heads, features, losses


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", THREE_TASK_NAMES)
def test_reference_values(name: str, chunk_size: int | None) -> None:
    jacobian, p0, heads, features, losses = _three_tasks()
    aggregator = UPGrad() if name == "UPGrad" else AGGREGATOR_FACTORIES[name]()
    mtl_backward(losses, features, aggregator, parallel_chunk_size=chunk_size)
    for head in heads:
        assert_close(head.grad, features.detach())
    expected = aggregator(torch.stack([head.detach() for head in heads]) @ jacobian)
    assert p0.grad is not None
    assert_close(p0.grad, expected, rtol=1e-4, atol=1e-5)


def test_tasks_sharing_a_parameter() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    p1 = torch.tensor(3.0, requires_grad=True)
    p2 = torch.tensor(-4.0, requires_grad=True)
    p12 = torch.tensor(0.5, requires_grad=True)
    f = torch.tensor([-1.0, 1.0]) @ p0
    y1 = f * p1 * p12
    y2 = f * p2 * p12
    mtl_backward([y1, y2], f, Mean())
    f_value = f.detach()
    assert_close(p12.grad, f_value * p1.detach() + f_value * p2.detach())
    assert_close(p1.grad, f_value * p12.detach())
    assert_close(p2.grad, f_value * p12.detach())
    expected = torch.stack([p1 * p12, p2 * p12]).detach()[:, None] * torch.tensor([-1.0, 1.0])
    assert_close(p0.grad, expected.mean(dim=0))


def test_explicit_params_and_shared_task_params() -> None:
    _, p0, heads, features, losses = _three_tasks()
    extra = torch.tensor(2.0, requires_grad=True)
    losses = [loss * extra for loss in losses]
    mtl_backward(
        losses,
        features,
        Sum(),
        tasks_params=[[heads[0], extra], [heads[1], extra], [heads[2], extra]],
        shared_params=[p0, p0],
    )
    expected_extra = sum((head @ features).detach() for head in heads)
    assert isinstance(expected_extra, Tensor)
    assert_close(extra.grad, expected_extra)
    for head in heads:
        assert_close(head.grad, 2 * features.detach())


def test_matches_reference_on_a_network() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh())
    heads = [nn.Linear(3, 1), nn.Linear(3, 2)]
    features = trunk(torch.randn(8, 4))
    losses = [heads[0](features).pow(2).mean(), heads[1](features).abs().mean()]
    shared = list(trunk.parameters())
    aggregator = SolveAggregator()
    expected_shared = split_like(aggregator(reference_jacobian(losses, shared)), shared)
    expected_heads = [
        torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        for loss, head in zip(losses, heads)
    ]
    mtl_backward(losses, features, aggregator, parallel_chunk_size=1)
    for param, grad in zip(shared, expected_shared):
        assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    for head, grads in zip(heads, expected_heads):
        for param, grad in zip(head.parameters(), grads):
            assert_close(param.grad, grad)


def test_several_features_equal_their_concatenation() -> None:
    def run(split: bool) -> Tensor:
        torch.manual_seed(0)
        p0 = torch.randn(3, requires_grad=True)
        f1 = p0 * 2
        f2 = p0[:2].exp()
        heads = [torch.randn(5) for _ in range(3)]
        if split:
            features: list[Tensor] = [f1, f2]
            losses = [(h[:3] * f1).sum() + (h[3:] * f2).sum() for h in heads]
        else:
            cat = torch.cat([f1, f2])
            features = [cat]
            losses = [(h * cat).sum() for h in heads]
        mtl_backward(losses, features, SolveAggregator())
        assert p0.grad is not None
        return p0.grad

    assert_close(run(split=True), run(split=False))


def test_loss_not_depending_on_features_gives_zero_row() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    head = torch.tensor(3.0, requires_grad=True)
    f = p0 * 2
    losses = [f.sum() * head, head**2]
    aggregator, recorder = recorded(Sum())
    mtl_backward(losses, f, aggregator)
    assert_close(recorder.matrices[0], torch.tensor([[6.0, 6.0], [0.0, 0.0]]))
    assert_close(head.grad, torch.tensor(6.0 + 6.0))


def test_docstring_example() -> None:
    for aggregator in [UPGrad(), Mean()]:
        shared = torch.tensor([1.0, 2.0], requires_grad=True)
        head = torch.tensor([1.0, 0.5], requires_grad=True)
        features = shared**2
        mtl_backward([features.sum(), head @ features], features, aggregator)
        assert_close(shared.grad, torch.tensor([2.0, 3.0]))
        assert_close(head.grad, torch.tensor([1.0, 4.0]))


def test_empty_shared_params_skips_shared_part() -> None:
    _, p0, heads, features, losses = _three_tasks()
    aggregator, recorder = recorded(Mean())
    mtl_backward(losses, features, aggregator, shared_params=[])
    assert recorder.matrices == []
    assert p0.grad is None
    assert all(head.grad is not None for head in heads)


def test_task_grads_written_before_shared_part() -> None:
    class Failing(Aggregator):
        def forward(self, matrix: Tensor, /) -> Tensor:
            raise RuntimeError("shared part failed")

    _, p0, heads, features, losses = _three_tasks()
    with pytest.raises(RuntimeError, match="shared part failed"):
        mtl_backward(losses, features, Failing())
    assert all(head.grad is not None for head in heads)
    assert p0.grad is None


def test_losses_sharing_nodes_above_features_need_retain_graph() -> None:
    def setup() -> tuple[list[Tensor], Tensor, Tensor]:
        p0 = torch.tensor([1.0, 2.0], requires_grad=True)
        p1 = torch.tensor([3.0, 4.0], requires_grad=True)
        p2 = torch.tensor(2.0, requires_grad=True)
        f = p0.exp()
        y1 = torch.tanh(f * p1).sum()
        y2 = y1 * p2
        return [y1, y2], f, p0

    losses, f, _ = setup()
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        mtl_backward(losses, f, Mean())
    losses, f, p0 = setup()
    mtl_backward(losses, f, Mean(), retain_graph=True)
    assert p0.grad is not None


@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "ColumnMedian"])
def test_retain_graph_semantics(name: str) -> None:
    p0 = torch.tensor([1.0, -2.0], requires_grad=True)
    features = torch.tanh(p0 * 3)  # Saves tensors for backward, so freeing is observable.
    losses = [(features**2).sum(), features[0] * 3.0, features.prod()]
    aggregator = AGGREGATOR_FACTORIES[name]()
    mtl_backward(losses, features, aggregator, retain_graph=True, parallel_chunk_size=1)
    assert p0.grad is not None
    first = p0.grad.clone()
    mtl_backward(losses, features, aggregator, parallel_chunk_size=1)
    assert_close(p0.grad, 2 * first)
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        mtl_backward(losses, features, aggregator, parallel_chunk_size=1)


def test_deep_trunk() -> None:
    p0 = torch.tensor([1.0, -1.0], requires_grad=True)
    hidden = p0
    for _ in range(10_000):
        hidden = hidden * 1.0
    head = torch.tensor([2.0, 3.0], requires_grad=True)
    losses = [hidden.sum(), head @ hidden]
    mtl_backward(losses, hidden, recorded(Sum())[0])
    assert_close(p0.grad, torch.tensor([3.0, 4.0]))
    assert_close(head.grad, torch.tensor([1.0, -1.0]))


def test_float64() -> None:
    jacobian, p0, heads, _, _ = _three_tasks()
    p0d = p0.detach().double().requires_grad_()
    headsd = [head.detach().double().requires_grad_() for head in heads]
    featuresd = jacobian.double() @ p0d
    mtl_backward([h @ featuresd for h in headsd], featuresd, SolveAggregator())
    assert p0d.grad is not None and p0d.grad.dtype == torch.float64
    expected = SolveAggregator()(torch.stack([h.detach() for h in headsd]) @ jacobian.double())
    assert_close(p0d.grad, expected, rtol=1e-10, atol=1e-12)


# Validation


def test_bad_parallel_chunk_size() -> None:
    with pytest.raises(ValueError, match=r"should be `None` or greater than `0`\. \(got 0\)"):
        mtl_backward([], [], Mean(), parallel_chunk_size=0)


def test_duplicate_losses_and_features() -> None:
    _, _, _, features, losses = _three_tasks()
    with pytest.raises(ValueError, match=r"^`losses` should contain unique elements\.$"):
        mtl_backward([losses[0], losses[0]], features, Mean())
    with pytest.raises(ValueError, match=r"^`features` should contain unique elements\.$"):
        mtl_backward(losses, [features, features], Mean())


def test_features_without_grad_fn() -> None:
    _, _, heads, _, _ = _three_tasks()
    leaf = torch.ones(4, requires_grad=True)
    losses = [head @ leaf for head in heads]
    with pytest.raises(ValueError, match=r"^All `tensors` should have a `grad_fn`\.$"):
        mtl_backward(losses, leaf, Mean())
    with pytest.raises(ValueError, match=r"^All `excluded` tensors should have a `grad_fn`\.$"):
        mtl_backward(losses, leaf, Mean(), shared_params=[])


def test_loss_without_grad_fn() -> None:
    _, _, _, features, losses = _three_tasks()
    with pytest.raises(ValueError, match=r"^All `tensors` should have a `grad_fn`\.$"):
        mtl_backward([*losses, torch.tensor(1.0)], features, Mean())


def test_empty_features() -> None:
    with pytest.raises(ValueError, match=r"^`features` cannot be empty\.$"):
        mtl_backward([], [], Mean())
    _, _, _, _, losses = _three_tasks()
    with pytest.raises(ValueError, match=r"^`features` cannot be empty\.$"):
        mtl_backward(losses, [], Mean())


def test_overlap_between_shared_and_task_params() -> None:
    _, p0, heads, features, losses = _three_tasks()
    message = r"^`tasks_params` should contain no tensor in common with `shared_params`\.$"
    with pytest.raises(ValueError, match=message):
        mtl_backward(losses, features, Mean(), tasks_params=[[heads[0]], [heads[1]], [p0]])
    # With default discovery: a loss using a shared parameter without going through features.
    bypass = [losses[0] + p0.sum(), losses[1], losses[2]]
    with pytest.raises(ValueError, match=message):
        mtl_backward(bypass, features, Mean())


def test_non_scalar_losses() -> None:
    _, _, heads, features, _ = _three_tasks()
    with pytest.raises(ValueError, match=r"^`losses` should contain only scalars\.$"):
        mtl_backward([heads[0] * features], features, Mean())


def test_empty_losses() -> None:
    _, _, _, features, _ = _three_tasks()
    with pytest.raises(ValueError, match=r"^`losses` cannot be empty$"):
        mtl_backward([], features, Mean())


def test_losses_and_tasks_params_sizes() -> None:
    _, _, heads, features, losses = _three_tasks()
    with pytest.raises(ValueError, match=r"^`losses` and `tasks_params` should have the same size"):
        mtl_backward(losses, features, Mean(), tasks_params=[[heads[0]], [heads[1]]])


def test_single_tensor_loss_and_feature() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    features = p0 * 3
    loss = features.sum()
    mtl_backward(loss, features, Mean())  # type: ignore[arg-type]
    assert_close(p0.grad, torch.tensor([3.0, 3.0]))


def test_non_leaf_task_param_retaining_grad() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    raw_head = torch.tensor([3.0, 4.0], requires_grad=True)
    head = raw_head * 1.0
    head.retain_grad()
    features = p0 * 2
    losses = [head @ features, features.sum()]
    mtl_backward(losses, features, Sum(), tasks_params=[[head], []])
    assert_close(head.grad, features.detach())
    assert raw_head.grad is None
    assert_close(p0.grad, 2 * head.detach() + 2.0)
