"""What the engine refuses (never a silently wrong Gramian), and that it keeps working after."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _autogram_zoo import reference_gramian, trainable_parameters
from torch import Tensor, nn

from torchjd.autogram import Engine


def _assert_works_after(
    engine: Engine, forward: Callable[[], Tensor], params: list[Tensor]
) -> None:
    output = forward()
    torch.testing.assert_close(engine.compute_gramian(output), reference_gramian(output, params))


class UsesChildWeight(nn.Module):
    """Uses its child's parameters without calling the child."""

    def __init__(self, also_call: bool, own_parameter: bool) -> None:
        super().__init__()
        self.child = nn.Linear(4, 4)
        self.also_call = also_call
        self.scale = nn.Parameter(torch.ones(4)) if own_parameter else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.child.weight)
        if self.also_call:
            out = out + self.child(x)
        if self.scale is not None:
            out = out * self.scale
        return out


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("also_call", [False, True])
@pytest.mark.parametrize("own_parameter", [False, True])
def test_parent_using_child_parameters(
    batch_dim: int | None, also_call: bool, own_parameter: bool
) -> None:
    model = UsesChildWeight(also_call, own_parameter)
    engine = Engine(model, batch_dim=batch_dim)
    output = model(torch.randn(3, 4)).sum(dim=1)
    if also_call or own_parameter:
        with pytest.raises(ValueError, match=r"`child\.weight`"):
            engine.compute_gramian(output)
    else:
        with pytest.raises(RuntimeError, match="called"):  # no hooked module was called at all
            engine.compute_gramian(output)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_parameter_used_outside_any_call(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    engine = Engine(model, batch_dim=batch_dim)
    output = model(torch.randn(3, 4)).sum(dim=1) + model[0].weight.square().sum()
    with pytest.raises(ValueError, match=r"`0\.weight` .* outside any call"):
        engine.compute_gramian(output)
    _assert_works_after(
        engine, lambda: model(torch.randn(3, 4)).sum(dim=1), list(model.parameters())
    )


def test_batch_norm_in_training_mode_among_covered_modules() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="batch"):
        # Refused when the engine is built, or at the latest when computing.
        engine = Engine(model, batch_dim=0)
        engine.compute_gramian(model(torch.randn(6, 5)).sum(dim=1))


def test_batch_norm_switched_to_training_mode_after_construction() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    engine = Engine(model, batch_dim=0)
    model.train()
    output = model(torch.randn(6, 5)).sum(dim=1)
    with pytest.raises(ValueError, match="batch"):
        engine.compute_gramian(output)
    model.eval()
    _assert_works_after(
        engine, lambda: model(torch.randn(6, 5)).sum(dim=1), list(model.parameters())
    )


def test_frozen_batch_norm_in_training_mode_between_covered_calls() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[1].requires_grad_(False)
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(6, 5)).sum(dim=1)
    with pytest.raises(ValueError, match="batch norm using batch statistics"):
        engine.compute_gramian(output)


def test_functional_batch_norm_inside_a_fallback_module_above_a_call() -> None:
    class Normalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x: Tensor) -> Tensor:
            return F.batch_norm(self.inner(x), None, None, self.weight, training=True)

    model = Normalised()
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(6, 4)).sum(dim=1)
    with pytest.raises(ValueError, match="batch norm using batch statistics"):
        engine.compute_gramian(output)


def test_batch_norm_without_running_stats_refused_at_construction() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="batch"):
        Engine(model, batch_dim=0)
    Engine(model, batch_dim=None)  # fine without per-sample structure


def test_batch_norm_in_training_mode_is_exact_with_batch_dim_none() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    engine = Engine(model, batch_dim=None)
    output = model(torch.randn(6, 5)).sum(dim=1)
    expected = reference_gramian(output, list(model.parameters()))
    torch.testing.assert_close(engine.compute_gramian(output), expected)


def test_output_not_batched_on_dim_0() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    engine = Engine(lin, batch_dim=0)
    # The module sees [T, B, 4]: its outputs are batched on dim 1.
    output = lin(torch.randn(3, 5, 4)).sum(dim=(0, 2))
    with pytest.raises(ValueError, match="batched on dim 0"):
        engine.compute_gramian(output)
    _assert_works_after(engine, lambda: lin(torch.randn(5, 4)).sum(dim=1), list(lin.parameters()))


def test_rnn_with_batch_second() -> None:
    rnn = nn.RNN(3, 4)
    with pytest.raises(ValueError):
        engine = Engine(rnn, batch_dim=0)
        output, _ = rnn(torch.randn(5, 2, 3))
        engine.compute_gramian(output.sum(dim=(0, 2)))


def test_parametrization_with_batch_dim() -> None:
    model = nn.Linear(4, 3)
    torch.nn.utils.parametrizations.weight_norm(model)
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(5, 4)).sum(dim=1)
    with pytest.raises(ValueError, match="batched on dim 0"):
        engine.compute_gramian(output)


def test_reentrant_checkpointing() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    engine = Engine(model, batch_dim=0)
    x = torch.randn(4, 5, requires_grad=True)
    output = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=True).sum(dim=1)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        engine.compute_gramian(output)


def test_input_modified_in_place_after_the_call() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    engine = Engine(model[2], batch_dim=0)
    hidden = model[0](torch.randn(5, 4)) * 1.0
    output = model[2](hidden)
    hidden.mul_(2.0)  # what model[2] read is gone
    with pytest.raises(ValueError, match="modified in place"):
        engine.compute_gramian(output.sum(dim=1))


def test_second_gramian_of_the_same_forward() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(5, 4)).sum(dim=1)
    engine.compute_gramian(output)
    with pytest.raises(RuntimeError, match="already"):
        engine.compute_gramian(output)


def test_view_output_modified_in_place_is_exact() -> None:
    """``F.linear`` on 3-d inputs returns a view; an in-place ReLU then rewires the graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(5, 2, 4)).sum(dim=(1, 2))
    expected = reference_gramian(output, trainable_parameters([model]))
    torch.testing.assert_close(engine.compute_gramian(output), expected)


def test_partial_view_output_modified_in_place() -> None:
    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: Tensor) -> Tensor:
            return (x @ self.weight)[:, :2]

    model = Halves()
    engine = Engine(model, batch_dim=0)
    out = model(torch.randn(5, 4))
    out.relu_()
    with pytest.raises(ValueError):
        engine.compute_gramian(out.sum(dim=1))
