"""The engine against the slow reference, on every setting of the zoo, in both modes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from _autogram_zoo import SETTINGS, Setting, reference_gramian, trainable_parameters
from torch import Tensor, nn

from torchjd.autogram import Engine
from torchjd.autogram._rules import find_rule


def _assert_gramians_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    scale = max(1.0, expected.abs().max().item())
    tolerance = 1e-10 if expected.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(actual, expected, rtol=tolerance * 10, atol=tolerance * scale)


def _cases() -> list[object]:
    params = []
    for setting in SETTINGS:
        marks = [pytest.mark.slow] if setting.slow else []
        if setting.batched:
            params.append(
                pytest.param(setting, "batched", id=f"{setting.name}-batched", marks=marks)
            )
        params.append(pytest.param(setting, "summed", id=f"{setting.name}-summed", marks=marks))
    return params


@pytest.mark.parametrize(("setting", "mode"), _cases())
def test_matches_reference(setting: Setting, mode: str) -> None:
    torch.manual_seed(0)
    case = setting.build()
    assert (case.batch_dim is not None) == setting.batched
    batch_dim = case.batch_dim if mode == "batched" else None
    engine = Engine(*case.modules, batch_dim=batch_dim)
    output = case.forward()
    if setting.needs_rule_for is not None and not _has_rule(case.modules, setting.needs_rule_for):
        # Without its rule, such a module uses parameters of a child it never calls: refused.
        with pytest.raises(ValueError, match="used inside a call"):
            engine.compute_gramian(output)
        return
    gramian = engine.compute_gramian(output)
    expected = reference_gramian(output, trainable_parameters(case.modules))
    _assert_gramians_close(gramian, expected)
    # The state was reset: the next iteration works as well.
    output = case.forward()
    gramian = engine.compute_gramian(output)
    _assert_gramians_close(gramian, reference_gramian(output, trainable_parameters(case.modules)))


def _has_rule(modules: Sequence[nn.Module], module_type: type[nn.Module]) -> bool:
    instance = next(m for root in modules for m in root.modules() if isinstance(m, module_type))
    return find_rule(instance) is not None


def test_zoo_is_large_enough() -> None:
    assert len(SETTINGS) >= 25
