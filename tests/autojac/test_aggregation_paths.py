"""The fast strategies of the engine (Gramian accumulated block by block; one weighted
vector-Jacobian product for row-count-only weightings) give the same ``.grad`` as the generic one,
which a hook forces, and are only taken when nothing can observe the difference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.modules.module as torch_module
from _autojac_utils import AGGREGATOR_FACTORIES, N_ROWS, SolveAggregator, SolveWeighting
from torch import Tensor, nn
from torch.testing import assert_close

from torchjd.aggregation import Aggregator, Mean, Sum, UPGrad
from torchjd.aggregation._aggregator_bases import GramianWeightedAggregator, WeightedAggregator
from torchjd.autojac import backward, mtl_backward
from torchjd.autojac._jacobian import (
    _unobserved_gramian_weighting,
    _unobserved_row_count_weighting,
)

FAST_NAMES = [
    "Mean",
    "Sum",
    "Constant",
    "UPGrad",
    "MGDA",
    "IMTLG",
    "AlignedMTL",
    "Krum",
    "SolveAggregator",
]


def _noop_pre_hook(_module: nn.Module, _args: tuple[Tensor, ...]) -> None:
    return None


def _model_and_losses(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2))
    model = model.to(dtype)
    losses = model(torch.randn(N_ROWS, 4, dtype=dtype)).pow(2).sum(dim=1)
    return model, losses


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _run(
    aggregator: Aggregator, chunk_size: int | None, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    model, losses = _model_and_losses(dtype)
    backward(losses, aggregator, parallel_chunk_size=chunk_size)
    return _grads(model)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
@pytest.mark.parametrize("hook_on", ["aggregator", "weighting"])
@pytest.mark.parametrize("name", FAST_NAMES)
def test_fast_path_equals_generic_path(name: str, hook_on: str, chunk_size: int | None) -> None:
    fast = AGGREGATOR_FACTORIES[name]()
    generic = AGGREGATOR_FACTORIES[name]()
    assert isinstance(generic, WeightedAggregator)
    target: nn.Module = generic if hook_on == "aggregator" else generic.weighting
    target.register_forward_pre_hook(_noop_pre_hook)
    assert _unobserved_gramian_weighting(generic) is None
    assert _unobserved_row_count_weighting(generic) is None

    fast_grads = _run(fast, chunk_size)
    generic_grads = _run(generic, chunk_size)
    assert len(fast_grads) == len(generic_grads) == 6
    for fast_grad, generic_grad in zip(fast_grads, generic_grads):
        # IMTLG's pseudo-inverse amplifies the rounding differences between G = J Jᵀ and
        # G = sum_b J_b J_bᵀ a little.
        assert_close(fast_grad, generic_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "MGDA"])
def test_fast_path_equals_generic_path_in_mtl(name: str) -> None:
    def run(aggregator: Aggregator) -> list[Tensor]:
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        heads = [nn.Linear(3, 1) for _ in range(N_ROWS)]
        features = trunk(torch.randn(8, 4))
        losses = [head(features).pow(2).mean() for head in heads]
        mtl_backward(losses, features, aggregator, parallel_chunk_size=2)
        return _grads(trunk)

    generic = AGGREGATOR_FACTORIES[name]()
    generic.register_forward_pre_hook(_noop_pre_hook)
    for fast_grad, generic_grad in zip(run(AGGREGATOR_FACTORIES[name]()), run(generic)):
        assert_close(fast_grad, generic_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["Mean", "SolveAggregator"])
def test_fast_path_equals_generic_path_in_other_dtypes(name: str, dtype: torch.dtype) -> None:
    generic = AGGREGATOR_FACTORIES[name]()
    generic.register_forward_pre_hook(_noop_pre_hook)
    fast_grads = _run(AGGREGATOR_FACTORIES[name](), None, dtype)
    generic_grads = _run(generic, None, dtype)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-10
    for fast_grad, generic_grad in zip(fast_grads, generic_grads):
        assert fast_grad.dtype == dtype
        assert_close(fast_grad, generic_grad, rtol=tolerance, atol=tolerance)


def test_fast_paths_are_selected() -> None:
    assert _unobserved_row_count_weighting(Mean()) is not None
    assert _unobserved_row_count_weighting(Sum()) is not None
    assert _unobserved_row_count_weighting(SolveAggregator()) is None
    assert isinstance(_unobserved_gramian_weighting(SolveAggregator()), SolveWeighting)
    assert _unobserved_gramian_weighting(Mean()) is None


def test_upgrad_takes_the_gramian_path() -> None:
    aggregator = UPGrad()
    assert isinstance(aggregator, GramianWeightedAggregator)
    assert _unobserved_gramian_weighting(aggregator) is aggregator.gramian_weighting


@pytest.mark.parametrize(
    "observe",
    [
        lambda a: a.register_forward_hook(lambda *_: None),
        lambda a: a.register_forward_pre_hook(_noop_pre_hook),
        lambda a: a.weighting.register_forward_hook(lambda *_: None),
        lambda a: a.weighting.register_forward_pre_hook(_noop_pre_hook),
    ],
)
def test_hooks_disable_fast_paths(observe: Callable[[WeightedAggregator], object]) -> None:
    mean, solve = Mean(), SolveAggregator()
    observe(mean)
    observe(solve)
    assert _unobserved_row_count_weighting(mean) is None
    assert _unobserved_gramian_weighting(solve) is None


def test_global_hooks_disable_fast_paths() -> None:
    handle = torch_module.register_module_forward_hook(lambda *_: None)
    try:
        assert _unobserved_row_count_weighting(Mean()) is None
        assert _unobserved_gramian_weighting(SolveAggregator()) is None
    finally:
        handle.remove()
    assert _unobserved_row_count_weighting(Mean()) is not None


def test_overridden_forward_or_replaced_weighting_disables_fast_paths() -> None:
    class LoudMean(Mean):
        def forward(self, matrix: Tensor, /) -> Tensor:
            return super().forward(matrix) * 2

    class LoudSolve(SolveAggregator):
        def forward(self, matrix: Tensor, /) -> Tensor:
            return super().forward(matrix) * 2

    assert _unobserved_row_count_weighting(LoudMean()) is None
    assert _unobserved_gramian_weighting(LoudSolve()) is None

    replaced = Mean()
    replaced.weighting = SolveWeighting()
    assert _unobserved_row_count_weighting(replaced) is None

    # The overriding forward is honoured: twice the mean.
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    backward(torch.stack([x.sum(), x[0]]), LoudMean())
    assert_close(x.grad, torch.tensor([2.0, 1.0]))


def test_gramian_weighting_hook_sees_the_gramian() -> None:
    # A hook on the inner Gramian weighting does not disable the Gramian path; it sees G = J Jᵀ.
    aggregator = SolveAggregator()
    seen: list[Tensor] = []
    aggregator.gramian_weighting.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(N_ROWS, 7, generator=generator)
    x = torch.randn(7, generator=generator, requires_grad=True)
    backward(jacobian @ x, aggregator, parallel_chunk_size=2)
    assert len(seen) == 1
    assert_close(seen[0], jacobian @ jacobian.T, rtol=1e-5, atol=1e-5)
