"""Host synchronisations on CUDA, counted with ``torch.cuda.set_sync_debug_mode("warn")``.

Each bound comes from a docstring of the code under test (quoted next to it). On the CPU, the
counter does nothing (the count stays 0) but every computation still runs and is checked, so the
logic of these tests is exercised on every run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _device_models import EMBEDDING_PAIRS, EMBEDDING_SHORT, MODEL_NAMES, build
from _device_utils import DEVICES, assert_close_to, assert_on, count_host_syncs
from torch import Tensor

import torchjd.autogram._rules._embedding as embedding_rule
from torchjd.aggregation import DualProjWeighting, MeanWeighting, MGDAWeighting, UPGradWeighting
from torchjd.aggregation._mgda import _frank_wolfe
from torchjd.aggregation._utils import normalize, regularize
from torchjd.autogram import Engine

# `_dual_cone.py` (module docstring, `_solve_masked`): on accelerators, "one read back to the host
# per round (typically two to four per call, as the warm start leaves one to three rounds)". The
# problems below are well conditioned and small: they are solved in the typical number of rounds.
_DUAL_CONE_SYNCS = 4


def _gramian(m: int, device: str = "cpu") -> Tensor:
    generator = torch.Generator().manual_seed(m)
    rows = torch.randn(m, m + 4, generator=generator, dtype=torch.float64)
    rows = rows - 0.8 * rows.mean(dim=0)  # conflicting rows
    return (rows @ rows.T).to(device)


def _counted(device: str, function: Callable[[], Tensor]) -> tuple[Tensor, int, list[str]]:
    """``function()`` once to warm up (lazy initialisations, e.g. of cuBLAS, may synchronise),
    then once counted."""
    function()
    with count_host_syncs(device) as syncs:
        result = function()
    return result, syncs.count, syncs.messages


@pytest.mark.parametrize("device", DEVICES)
def test_mgda_weighting(device: str) -> None:
    gramian = _gramian(8, device)
    weights, count, messages = _counted(device, lambda: MGDAWeighting()(gramian))
    # `MGDAWeighting`: "On other devices, ... all `max_iters` steps are run and the iterate is
    # frozen (with torch.where) from the step where it would have stopped: the result is the same,
    # with no host synchronisation."
    assert count == 0, messages
    assert_on(weights, device, torch.float64)
    assert_close_to(weights, MGDAWeighting()(_gramian(8)), rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_mgda_frozen_iterations_match_early_stop(device: str) -> None:
    """The device path (no early stop, frozen iterate) gives the result of the CPU path."""
    gramian = _gramian(8, device)
    frozen = _frank_wolfe(gramian, epsilon=1e-3, max_iters=100, stop_on_host=False)
    stopped = _frank_wolfe(gramian, epsilon=1e-3, max_iters=100, stop_on_host=True)
    assert_on(frozen, device, torch.float64)
    assert_close_to(frozen, stopped, rtol=1e-12)
    assert abs(frozen.sum().item() - 1.0) < 1e-12
    assert frozen.min().item() >= 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trace", [6.0, 1e-6], ids=["trace=6", "trace=1e-6"])
def test_normalize_and_regularize(trace: float, device: str) -> None:
    reference = torch.tensor([[4.0, -1.0], [-1.0, 2.0]], dtype=torch.float64) * trace / 6.0
    gramian = reference.to(device)

    def normalized_and_regularized() -> Tensor:
        return regularize(normalize(gramian, eps=1e-4), eps=0.5)

    result, count, messages = _counted(device, normalized_and_regularized)
    # `normalize`: "Stays on the device: the branch is taken with torch.where, not with a
    # host-side test"; `regularize` adds a multiple of the identity built on the device.
    assert count == 0, messages
    assert_on(result, device, torch.float64)
    # The trace of `reference` is `trace`: below `eps`, the Gramian counts as zero.
    normalized = reference / trace if trace >= 1e-4 else torch.zeros_like(reference)
    expected = normalized + 0.5 * torch.eye(2, dtype=torch.float64)
    assert_close_to(result, expected, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_mean_weighting(device: str) -> None:
    gramian = _gramian(5, device)
    weights, count, messages = _counted(device, lambda: MeanWeighting()(gramian))
    assert count == 0, messages  # 1/m each: nothing depends on the values
    assert_on(weights, device, torch.float64)
    assert_close_to(weights, torch.full((5,), 0.2, dtype=torch.float64), rtol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [5, 40])
@pytest.mark.parametrize(
    "weighting_class", [UPGradWeighting, DualProjWeighting], ids=lambda cls: cls.__name__
)
def test_dual_cone_weighting(
    weighting_class: type[UPGradWeighting] | type[DualProjWeighting], m: int, device: str
) -> None:
    gramian = _gramian(m, device)
    weights, count, messages = _counted(device, lambda: weighting_class()(gramian))
    assert count <= _DUAL_CONE_SYNCS, messages
    assert_on(weights, device, torch.float64)
    assert_close_to(weights, weighting_class()(_gramian(m)), rtol=1e-7)


# `_rules/_embedding.py`: the ghost and vocabulary forms make no host synchronisation; the pair
# form, on an accelerator, "one host synchronisation (the numbers of repeated tokens and of pairs
# decide the shapes)". No other rule, nor the engine, documents any: zero for them.
_EMBEDDING_FORMS = {
    (EMBEDDING_SHORT, 0): "ghost",
    (EMBEDDING_SHORT, None): "vocabulary",  # all the tokens form one sample: 15 > 10 ids
    (EMBEDDING_PAIRS, 0): "pairs",
    (EMBEDDING_PAIRS, None): "pairs",
}
_ENGINE_SYNCS = {EMBEDDING_PAIRS: 1}


def _spy_on_forms(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which form of the embedding rule computes each Gramian."""
    used: list[str] = []
    for form in ("ghost", "vocabulary", "pairs"):
        original = getattr(embedding_rule, f"_{form}_gramian")

        def spy(*args: object, _form: str = form, _original: Callable = original) -> Tensor:
            used.append(_form)
            return _original(*args)

        monkeypatch.setattr(embedding_rule, f"_{form}_gramian", spy)
    return used


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_dim", [0, None], ids=["batch_dim=0", "batch_dim=None"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_engine(
    model_name: str, batch_dim: int | None, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    used_forms = _spy_on_forms(monkeypatch)
    case = build(model_name)
    model, inputs = case.on(device, torch.float64)
    engine = Engine(model, batch_dim=batch_dim)
    engine.compute_gramian(case.losses(model, inputs))  # warm-up, not counted
    bound = _ENGINE_SYNCS.get(model_name, 0)

    losses = case.losses(model, inputs)
    with count_host_syncs(device) as syncs:
        gramian = engine.compute_gramian(losses)
    assert syncs.count <= bound, syncs.messages
    assert_on(gramian, device, torch.float64)

    losses = case.losses(model, inputs)
    with count_host_syncs(device) as syncs:
        weights = engine.backward(losses, MeanWeighting())
    assert syncs.count <= bound, syncs.messages
    assert_on(weights, device, torch.float64)

    losses = case.losses(model, inputs)
    with count_host_syncs(device) as syncs:
        weights = engine.backward(losses, UPGradWeighting())
    assert syncs.count <= bound + _DUAL_CONE_SYNCS, syncs.messages
    assert_on(weights, device, torch.float64)
    assert all(param.grad is not None for param in model.parameters())

    # Each of the four Gramians used the form whose bound is asserted.
    expected_form = _EMBEDDING_FORMS.get((model_name, batch_dim))
    assert used_forms == ([expected_form] * 4 if expected_form else []), used_forms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_dim", [0, None], ids=["batch_dim=0", "batch_dim=None"])
def test_embedding_pairs_counted_first(
    batch_dim: int | None, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accelerator branch of the pair form (the counts read first, `nonzero_static`), run on
    every device, gives the Gramian of the other branch."""
    case = build(EMBEDDING_PAIRS)
    model, inputs = case.on(device, torch.float64)
    engine = Engine(model, batch_dim=batch_dim)
    gramians = []
    for counts_first in (False, True):
        monkeypatch.setattr(
            embedding_rule, "_counts_before_positions", lambda _d, c=counts_first: c
        )
        gramians.append(engine.compute_gramian(case.losses(model, inputs)))
    assert_on(gramians[1], device, torch.float64)
    assert_close_to(gramians[1], gramians[0], rtol=1e-12)
