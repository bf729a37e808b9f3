"""The engine's API: construction, shapes, state, hooks, and interaction with plain autograd."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from _autogram_zoo import reference_gramian, trainable_parameters
from torch import Tensor, nn

from torchjd.autogram import Engine


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def test_batch_dim_is_keyword_only_and_required() -> None:
    model = _mlp()
    with pytest.raises(TypeError, match="batch_dim"):
        Engine(model)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Engine(model, 0)  # type: ignore[arg-type, call-arg]


@pytest.mark.parametrize("batch_dim", [1.0, "0", True])
def test_rejects_bad_batch_dim_types(batch_dim: object) -> None:
    with pytest.raises(TypeError, match="batch_dim"):
        Engine(_mlp(), batch_dim=batch_dim)  # type: ignore[arg-type]


def test_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="position 1"):
        Engine(_mlp(), "model", batch_dim=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(), (3,), (3, 2), (2, 3, 2), (2, 1, 2, 2)])
def test_shape_of_result(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 1)
    engine = Engine(lin, batch_dim=None)
    output = lin(torch.randn(*shape, 4)).squeeze(-1)
    gramian = engine.compute_gramian(output)
    assert gramian.shape == (*shape, *reversed(shape))
    torch.testing.assert_close(gramian, reference_gramian(output, list(lin.parameters())))


def test_scalar_is_squared_gradient_norm() -> None:
    torch.manual_seed(0)
    model = _mlp()
    engine = Engine(model, batch_dim=None)
    loss = model(torch.randn(6, 5)).square().sum()
    gramian = engine.compute_gramian(loss)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(gramian, sum(grad.square().sum() for grad in grads))


@pytest.mark.parametrize("batch_dim", [0, 1, 2, -1, -2, -3])
def test_result_does_not_depend_on_batch_dim(batch_dim: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
    x = torch.randn(4, 5)
    target_dim = batch_dim % 3
    batched = Engine(model, batch_dim=batch_dim)
    output = model(x).reshape(4, 2, 3).movedim(0, target_dim)
    gramian = batched.compute_gramian(output)
    del batched
    summed = Engine(model, batch_dim=None)
    output = model(x).reshape(4, 2, 3).movedim(0, target_dim)
    torch.testing.assert_close(gramian, summed.compute_gramian(output), rtol=1e-5, atol=1e-5)


def _mirror_second_half(gramian: Tensor) -> Tensor:
    """``[m.., m_k..m_1] <-> [m.., m_1..m_k]`` (an involution)."""
    ndim = gramian.ndim // 2
    return gramian.permute(*range(ndim), *reversed(range(ndim, 2 * ndim)))


def test_reshape_and_movedim_equivariance() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
    engine = Engine(model, batch_dim=None)
    x = torch.randn(4, 5)
    gramian = engine.compute_gramian(model(x).reshape(4, 2, 3))
    standard = _mirror_second_half(gramian)  # [4, 2, 3, 4, 2, 3]
    flat = engine.compute_gramian(model(x).reshape(4, 6))
    torch.testing.assert_close(flat, _mirror_second_half(standard.reshape(4, 6, 4, 6)))
    moved = engine.compute_gramian(model(x).reshape(4, 2, 3).movedim(0, 2))
    torch.testing.assert_close(moved, _mirror_second_half(standard.movedim(0, 2).movedim(3, 5)))


def test_dtype_follows_output() -> None:
    model = _mlp().double()
    engine = Engine(model, batch_dim=0)
    gramian = engine.compute_gramian(model(torch.randn(3, 5, dtype=torch.float64)).sum(dim=1))
    assert gramian.dtype == torch.float64


def test_partial_engine_and_full_backward() -> None:
    """The 0.8.0 IWRM loop: weights from the Gramian, then an ordinary weighted backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    engine = Engine(model[2:], batch_dim=0)
    x = torch.randn(6, 5)
    losses = model(x).squeeze(1) ** 2
    gramian = engine.compute_gramian(losses)
    expected = reference_gramian(losses, trainable_parameters([model[2:]]))
    torch.testing.assert_close(gramian, expected)
    weights = torch.rand(6)
    losses.backward(weights)
    for param in model.parameters():
        assert param.grad is not None  # the whole model, not only the engine's part
    grads = [param.grad.clone() for param in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    (model(x).squeeze(1) ** 2 @ weights).backward()
    for grad, param in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, param.grad)


def test_plain_autograd_is_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    x = torch.randn(6, 2, 5)
    out = model(x)
    out.square().sum().backward()
    expected_out = out.detach().clone()
    expected = [param.grad.clone() for param in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    engine = Engine(model, batch_dim=0)
    out = model(x)
    assert torch.equal(out, expected_out)
    out.square().sum().backward()
    for grad, param in zip(expected, model.parameters()):
        assert torch.equal(grad, param.grad)  # type: ignore[arg-type]
    del engine


def test_hooks_removed_when_engine_is_collected() -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    assert all(len(layer._forward_hooks) == 1 for layer in (model[0], model[2]))
    reference = weakref.ref(engine)
    del engine
    gc.collect()
    assert reference() is None
    assert all(len(layer._forward_hooks) == 0 for layer in model.modules())


def test_no_forward_raises_then_works() -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(3, 5)).sum(dim=1)
    engine.compute_gramian(output)
    with pytest.raises(RuntimeError, match="already"):
        engine.compute_gramian(output)
    with pytest.raises(RuntimeError, match="No call"):
        engine.compute_gramian(output * 2.0)
    output = model(torch.randn(3, 5)).sum(dim=1)
    assert engine.compute_gramian(output).shape == (3, 3)


def test_forward_under_no_grad_is_not_recorded() -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    with torch.no_grad():
        model(torch.randn(3, 5))
    output = model(torch.randn(3, 5)).sum(dim=1).detach()
    with pytest.raises(RuntimeError, match="require"):
        engine.compute_gramian(output)


def test_stale_forward_does_not_corrupt_next_one() -> None:
    torch.manual_seed(0)
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    model(torch.randn(3, 5))  # evaluation with gradients enabled, not followed by a Gramian
    output = model(torch.randn(4, 5)).sum(dim=1)
    gramian = engine.compute_gramian(output)
    torch.testing.assert_close(gramian, reference_gramian(output, list(model.parameters())))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_output_not_depending_on_engine(batch_dim: int | None) -> None:
    model, other = _mlp(), _mlp()
    engine = Engine(model, batch_dim=batch_dim)
    model(torch.randn(3, 5))
    output = other(torch.randn(3, 5)).sum(dim=1)
    with pytest.raises(RuntimeError, match="depend"):
        engine.compute_gramian(output)
    output = model(torch.randn(3, 5)).sum(dim=1)
    assert engine.compute_gramian(output).shape == (3, 3)


def test_all_parameters_frozen() -> None:
    model = _mlp().requires_grad_(False)
    engine = Engine(model, batch_dim=0)
    x = torch.randn(3, 5, requires_grad=True)
    output = model(x).sum(dim=1)
    with pytest.raises(RuntimeError):
        engine.compute_gramian(output)


def test_detached_output() -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(3, 5)).sum(dim=1)
    with pytest.raises(RuntimeError, match="require grad"):
        engine.compute_gramian(output.detach())
    # The failed call reset the state: the forward must be run again.
    output = model(torch.randn(3, 5)).sum(dim=1)
    assert engine.compute_gramian(output).shape == (3, 3)


@pytest.mark.parametrize("batch_dim", [2, -3, 5])
def test_batch_dim_out_of_range(batch_dim: int) -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=batch_dim)
    with pytest.raises(IndexError):
        engine.compute_gramian(model(torch.randn(3, 5)))


def test_batch_dim_on_scalar() -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    with pytest.raises(IndexError):
        engine.compute_gramian(model(torch.randn(3, 5)).sum())


def test_non_tensor_output() -> None:
    engine = Engine(_mlp(), batch_dim=0)
    with pytest.raises(TypeError, match="output"):
        engine.compute_gramian([1.0])  # type: ignore[arg-type]


def test_two_engines_on_the_same_modules() -> None:
    torch.manual_seed(0)
    model = _mlp()
    first = Engine(model, batch_dim=0)
    second = Engine(model[2], batch_dim=None)
    output = model(torch.randn(4, 5)).sum(dim=1)
    torch.testing.assert_close(
        first.compute_gramian(output), reference_gramian(output, list(model.parameters()))
    )
    torch.testing.assert_close(
        second.compute_gramian(output), reference_gramian(output, list(model[2].parameters()))
    )


def test_module_given_twice_or_with_a_descendant_is_counted_once() -> None:
    torch.manual_seed(0)
    model = _mlp()
    engine = Engine(model, model[2], model, batch_dim=0)
    output = model(torch.randn(4, 5)).sum(dim=1)
    expected = reference_gramian(output, list(model.parameters()))
    torch.testing.assert_close(engine.compute_gramian(output), expected)


def test_forward_is_not_rerun() -> None:
    calls = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x: Tensor) -> Tensor:
            calls.append(1)
            return x * self.weight

    model = Counting()
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(4, 3)).sum(dim=1)
    engine.compute_gramian(output)
    assert len(calls) == 1


def test_non_reentrant_checkpointing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    engine = Engine(model, batch_dim=0)
    x = torch.randn(4, 5)
    output = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False).sum(dim=1)
    gramian = engine.compute_gramian(output)
    torch.testing.assert_close(gramian, reference_gramian(output, list(model.parameters())))


def test_new_parameter_use_after_unfreezing_is_refused() -> None:
    model = _mlp()
    model[0].weight.requires_grad_(False)
    engine = Engine(model, batch_dim=0)
    model[0].weight.requires_grad_(True)
    output = model(torch.randn(3, 5)).sum(dim=1)
    with pytest.raises(ValueError, match=r"`0\.weight`"):
        engine.compute_gramian(output)


def test_parameter_frozen_after_construction_is_dropped() -> None:
    torch.manual_seed(0)
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    model[2].weight.requires_grad_(False)
    output = model(torch.randn(3, 5)).sum(dim=1)
    expected = reference_gramian(output, trainable_parameters([model]))
    torch.testing.assert_close(engine.compute_gramian(output), expected)


class _NumpySquare(torch.autograd.Function):
    """A backward that vmap cannot batch (it goes through numpy)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.from_numpy(2.0 * grad.numpy() * x.numpy())


@pytest.mark.parametrize("batch_dim", [0, None])
def test_seeds_one_at_a_time_when_vmap_fails(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 3), nn.Linear(3, 2)
    engine = Engine(first, second, batch_dim=batch_dim)
    output = second(_NumpySquare.apply(first(torch.randn(5, 4))))  # [5, 2]: several seeds
    params = [*first.parameters(), *second.parameters()]
    torch.testing.assert_close(engine.compute_gramian(output), reference_gramian(output, params))
