"""``autogram.Engine``, ``autojac.backward`` and ``autojac.mtl_backward`` on every device.

Models are built on the CPU in float64 and copied to the device (``copy.deepcopy(model).to(...)``);
the Gramians, weights and ``.grad`` fields computed there are compared with the plain autograd
reference computed on the CPU in float64 (Jacobian row by row).
"""

from __future__ import annotations

import pytest
import torch
from _device_models import MODEL_NAMES, build, reference_jacobian, split_like
from _device_utils import DEVICES, RTOL, assert_close_to, assert_on
from torch import Tensor, nn

from torchjd.aggregation import UPGrad, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autojac import backward, mtl_backward

_DTYPES = [torch.float64, torch.float32]


def _params(model: nn.Module) -> list[Tensor]:
    return [param for param in model.parameters() if param.requires_grad]


def _assert_grads(
    model: nn.Module, expected: list[Tensor], dtype: torch.dtype, device: str
) -> None:
    params = _params(model)
    assert len(params) == len(expected)
    scale = max(grad.abs().max().item() for grad in expected)
    for param, grad in zip(params, expected):
        assert param.grad is not None
        assert_on(param.grad, device, dtype)
        assert_close_to(param.grad, grad, rtol=RTOL[dtype], scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("batch_dim", [0, None], ids=["batch_dim=0", "batch_dim=None"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_autogram_engine(
    model_name: str, batch_dim: int | None, dtype: torch.dtype, device: str
) -> None:
    case = build(model_name)
    reference_model, reference_inputs = case.on("cpu", torch.float64)
    reference_params = _params(reference_model)
    jacobian = reference_jacobian(case.losses(reference_model, reference_inputs), reference_params)
    reference_gramian = jacobian @ jacobian.T
    reference_weights = UPGradWeighting()(reference_gramian)
    reference_grads = split_like(reference_weights @ jacobian, reference_params)

    model, inputs = case.on(device, dtype)
    engine = Engine(model, batch_dim=batch_dim)
    gramian = engine.compute_gramian(case.losses(model, inputs))
    assert_on(gramian, device, dtype)
    assert_close_to(gramian, reference_gramian, rtol=RTOL[dtype])

    weights = engine.backward(case.losses(model, inputs), UPGradWeighting())
    assert_on(weights, device, dtype)
    assert_close_to(weights, reference_weights, rtol=RTOL[dtype])
    _assert_grads(model, reference_grads, dtype, device)


def _trunk_and_heads() -> tuple[nn.Module, list[nn.Linear], Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
        heads = [nn.Linear(4, 1).double() for _ in range(3)]
        inputs = torch.randn(7, 5, dtype=torch.float64)
    return trunk, heads, inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_autojac_backward(dtype: torch.dtype, device: str) -> None:
    case = build("mlp")
    reference_model, reference_inputs = case.on("cpu", torch.float64)
    reference_params = _params(reference_model)
    jacobian = reference_jacobian(case.losses(reference_model, reference_inputs), reference_params)
    reference_grads = split_like(UPGrad()(jacobian), reference_params)

    model, inputs = case.on(device, dtype)
    backward(case.losses(model, inputs), UPGrad())
    _assert_grads(model, reference_grads, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_autojac_mtl_backward(dtype: torch.dtype, device: str) -> None:
    trunk, heads, inputs = _trunk_and_heads()
    features = trunk(inputs)
    reference_losses = torch.stack([head(features).square().mean() for head in heads])
    shared = _params(trunk)
    jacobian = reference_jacobian(reference_losses, shared)
    reference_shared = split_like(UPGrad()(jacobian), shared)
    reference_heads = [
        list(torch.autograd.grad(loss, _params(head), retain_graph=True))
        for loss, head in zip(reference_losses, heads)
    ]

    trunk = trunk.to(device=device, dtype=dtype)
    heads = [head.to(device=device, dtype=dtype) for head in heads]
    features = trunk(inputs.to(device=device, dtype=dtype))
    losses = [head(features).square().mean() for head in heads]
    mtl_backward(losses, features, UPGrad())
    _assert_grads(trunk, reference_shared, dtype, device)
    for head, expected in zip(heads, reference_heads):
        _assert_grads(head, expected, dtype, device)
