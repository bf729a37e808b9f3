from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _rule_reference import Use, assert_rule_matches, record_calls, reference_rows, trainable
from torch import nn

from torchjd.autogram._rules import find_rule
from torchjd.autogram._rules._norm import NormRule


def _with_running_stats(module: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(7)
    assert isinstance(module.running_mean, torch.Tensor)
    assert isinstance(module.running_var, torch.Tensor)
    module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
    module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return module.eval()


def _frozen_weight(module: nn.Module) -> nn.Module:
    module.get_parameter("weight").requires_grad_(False)
    return module


# (module factory, input shape without the batch dim)
CONFIGS: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (lambda: nn.LayerNorm(4), (3, 4)),
    (lambda: nn.LayerNorm((3, 4), eps=1e-2), (2, 3, 4)),
    (lambda: nn.LayerNorm(4, bias=False), (4,)),
    (lambda: _frozen_weight(nn.LayerNorm(5)), (2, 5)),
    (lambda: nn.RMSNorm(4), (2, 4)),
    (lambda: nn.RMSNorm((2, 3), eps=1e-3), (2, 3)),
    (lambda: nn.GroupNorm(2, 4), (4, 3, 2)),
    (lambda: nn.GroupNorm(1, 3, eps=1e-1), (3,)),
    (lambda: nn.InstanceNorm1d(3, affine=True), (3, 5)),
    (lambda: nn.InstanceNorm2d(2, affine=True), (2, 3, 4)),
    (lambda: nn.InstanceNorm3d(2, affine=True, track_running_stats=True), (2, 2, 3, 2)),
    (lambda: _with_running_stats(nn.InstanceNorm2d(2, affine=True, track_running_stats=True)),
     (2, 3, 3)),
    (lambda: _with_running_stats(nn.BatchNorm1d(3)), (3,)),
    (lambda: _with_running_stats(nn.BatchNorm1d(3)), (3, 4)),
    (lambda: _with_running_stats(nn.BatchNorm2d(2, eps=1e-3)), (2, 3, 2)),
    (lambda: _with_running_stats(nn.BatchNorm3d(2)), (2, 2, 2, 2)),
]  # fmt: skip


def _randomise_affine(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("index", range(len(CONFIGS)))
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(index: int, batched: bool, dtype: torch.dtype) -> None:
    factory, shape = CONFIGS[index]
    module = factory().to(dtype)
    generator = torch.Generator().manual_seed(index)
    _randomise_affine(module, generator)
    batch, seeds = (3, 3) if index % 2 else (5, 1)
    uses = [
        Use((torch.randn(batch, *shape, generator=generator, dtype=dtype),)),
        Use((torch.randn(batch, *shape, generator=generator, dtype=dtype) * 2 + 1,)),
    ]
    calls = record_calls(module, uses, seeds, generator)
    rule = find_rule(module)
    assert isinstance(rule, NormRule)
    params = trainable(module, rule)
    expected = reference_rows(module, calls, params, batched)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-10, 1e-11)
    assert_rule_matches(rule, module, calls, params, batched, expected, generator, rtol, atol)


@pytest.mark.parametrize(
    "factory", [lambda: nn.BatchNorm1d(3), lambda: nn.BatchNorm1d(3, track_running_stats=False)]
)
def test_batch_statistics_exact_in_summed_mode_refused_in_batched_mode(
    factory: Callable[[], nn.Module],
) -> None:
    module = factory().double()
    generator = torch.Generator().manual_seed(1)
    _randomise_affine(module, generator)
    uses = [Use((torch.randn(4, 3, 2, generator=generator, dtype=torch.float64),))]
    calls = record_calls(module, uses, 2, generator)
    rule = NormRule()
    expected = reference_rows(module, calls, ["weight", "bias"], batched=False)
    assert_rule_matches(
        rule, module, calls, ["weight", "bias"], False, expected, generator, 1e-10, 1e-11
    )
    with pytest.raises(ValueError, match="batch normalisation mixes the samples"):
        rule.check(module, batched=True)
    with pytest.raises(ValueError, match="batch_dim=None"):
        rule.gramian(module, calls, ["weight"], batched=True)
    module.eval()
    if module.running_mean is None:
        with pytest.raises(ValueError, match="batch statistics"):
            rule.check(module, batched=True)
    else:
        rule.check(module, batched=True)  # running statistics: the samples are separate


def test_unbatched_instance_norm_in_summed_mode() -> None:
    module = nn.InstanceNorm1d(3, affine=True).double()
    generator = torch.Generator().manual_seed(2)
    _randomise_affine(module, generator)
    uses = [Use((torch.randn(3, 6, generator=generator, dtype=torch.float64),))]
    calls = record_calls(module, uses, 2, generator)
    rule = NormRule()
    expected = reference_rows(module, calls, ["weight", "bias"], batched=False)
    assert_rule_matches(
        rule, module, calls, ["weight", "bias"], False, expected, generator, 1e-10, 1e-11
    )
    with pytest.raises(ValueError, match="unbatched input"):
        rule.gramian(module, calls, ["weight"], batched=True)


def test_layer_norm_over_the_batch_dim_is_refused() -> None:
    module = nn.LayerNorm((2, 3))
    generator = torch.Generator().manual_seed(3)
    calls = record_calls(module, [Use((torch.randn(2, 3),))], 1, generator)
    with pytest.raises(ValueError, match="normalised together"):
        NormRule().per_row_gradients(module, calls, ["weight"], batched=True)


def test_layer_norm_reused_with_different_shapes() -> None:
    module = nn.LayerNorm(4).double()
    generator = torch.Generator().manual_seed(4)
    _randomise_affine(module, generator)
    uses = [
        Use((torch.randn(3, 4, generator=generator, dtype=torch.float64),)),
        Use((torch.randn(3, 2, 5, 4, generator=generator, dtype=torch.float64),)),
    ]
    calls = record_calls(module, uses, 2, generator)
    rule = NormRule()
    for batched in (True, False):
        expected = reference_rows(module, calls, ["weight", "bias"], batched)
        assert_rule_matches(
            rule, module, calls, ["weight", "bias"], batched, expected, generator, 1e-10, 1e-11
        )


@pytest.mark.parametrize(
    "module",
    [nn.LayerNorm(2), nn.RMSNorm(2), nn.GroupNorm(1, 2), nn.BatchNorm1d(2), nn.BatchNorm2d(2),
     nn.BatchNorm3d(2), nn.SyncBatchNorm(2), nn.InstanceNorm1d(2, affine=True),
     nn.InstanceNorm2d(2, affine=True), nn.InstanceNorm3d(2, affine=True)],
)  # fmt: skip
def test_registered(module: nn.Module) -> None:
    assert isinstance(find_rule(module), NormRule)
