"""Every exported aggregator and weighting on every device, against the CPU float64 result.

Results must stay on the input's device and dtype. Deterministic methods (and PCGrad, whose
permutations come from the CPU generator) must equal the CPU float64 result up to the rounding
errors of the dtype; ``Random``/``RandomWeighting`` and ``GradDrop`` draw from the generator of the
input's device (CUDA's differs from the CPU's), so they are checked by the properties that hold for
any draw.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _device_utils import DEVICES, RTOL, assert_close_to, assert_on
from torch import Tensor, nn

import torchjd.aggregation as aggregation

_NOT_INSTANTIABLE = {"Aggregator", "Weighting", "GeneralizedWeighting", "NonDifferentiableError"}
_DTYPES = [torch.float64, torch.float32]

# (m, dtype, device) -> instance. Only Constant(Weighting) stores a tensor (of that dtype/device).
_Factory = Callable[[int, torch.dtype, str], nn.Module]


def _plain(name: str, *args: object, **kwargs: object) -> _Factory:
    return lambda _m, _dtype, _device: getattr(aggregation, name)(*args, **kwargs)


def _constant(name: str) -> _Factory:
    def make(m: int, dtype: torch.dtype, device: str) -> nn.Module:
        return getattr(aggregation, name)(torch.arange(1, m + 1, dtype=dtype, device=device))

    return make


_AGGREGATORS: dict[str, _Factory] = {
    "UPGrad": _plain("UPGrad"),
    "DualProj": _plain("DualProj"),
    "AlignedMTL": _plain("AlignedMTL"),
    "CAGrad": _plain("CAGrad", c=0.5),
    "ConFIG": _plain("ConFIG"),
    "Constant": _constant("Constant"),
    "GradDrop": _plain("GradDrop"),
    "IMTLG": _plain("IMTLG"),
    "Krum": _plain("Krum", 1, 2),
    "Mean": _plain("Mean"),
    "MGDA": _plain("MGDA"),
    "NashMTL": lambda m, _dtype, _device: aggregation.NashMTL(n_tasks=m),
    "PCGrad": _plain("PCGrad"),
    "Random": _plain("Random"),
    "Sum": _plain("Sum"),
    "TrimmedMean": _plain("TrimmedMean", 1),
}
_WEIGHTINGS: dict[str, _Factory] = {
    "UPGradWeighting": _plain("UPGradWeighting"),
    "DualProjWeighting": _plain("DualProjWeighting"),
    "AlignedMTLWeighting": _plain("AlignedMTLWeighting"),
    "CAGradWeighting": _plain("CAGradWeighting", c=0.5),
    "ConstantWeighting": _constant("ConstantWeighting"),
    "IMTLGWeighting": _plain("IMTLGWeighting"),
    "KrumWeighting": _plain("KrumWeighting", 1, 2),
    "MeanWeighting": _plain("MeanWeighting"),
    "MGDAWeighting": _plain("MGDAWeighting"),
    "PCGradWeighting": _plain("PCGradWeighting"),
    "RandomWeighting": _plain("RandomWeighting"),
    "SumWeighting": _plain("SumWeighting"),
}
_GENERALIZED = {"Flattening"}


def _integers() -> Tensor:
    # Small integers, with conflicting, linearly independent rows and no ties between rows.
    return torch.tensor(
        [
            [2.0, -1.0, 0.0, 3.0, 1.0, 0.0],
            [-1.0, 2.0, 1.0, 0.0, 2.0, 1.0],
            [1.0, 1.0, -2.0, 1.0, 0.0, 1.0],
            [0.0, -1.0, 2.0, 2.0, -1.0, 1.0],
            [3.0, 0.0, 1.0, -1.0, 1.0, -2.0],
        ],
        dtype=torch.float64,
    )


def _random() -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 9, generator=generator, dtype=torch.float64)


def _conflicting() -> Tensor:
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(8, 12, generator=generator, dtype=torch.float64)
    return rows - 0.8 * rows.mean(dim=0)


_MATRICES: dict[str, Callable[[], Tensor]] = {
    "integers": _integers,
    "random": _random,
    "conflicting": _conflicting,
}


def _call(instance: nn.Module, stat: Tensor) -> Tensor:
    torch.manual_seed(0)  # seeds the CPU and every CUDA generator
    return instance(stat)


def test_every_exported_class_is_covered() -> None:
    exported = set(aggregation.__all__) - _NOT_INSTANTIABLE
    covered = set(_AGGREGATORS) | set(_WEIGHTINGS) | _GENERALIZED
    assert exported == covered, f"missing: {exported - covered}, unknown: {covered - exported}"


def _check_random_combination(result: Tensor, matrix: Tensor) -> None:
    """``result = wᵀ J`` with ``w`` on the simplex (the rows of these matrices are independent,
    so ``w`` is unique and found by least squares)."""
    matrix64 = matrix.detach().cpu().double()
    result64 = result.detach().cpu().double()
    weights = torch.linalg.lstsq(matrix64.T, result64.unsqueeze(1)).solution.squeeze(1)
    tolerance = 10 * RTOL[result.dtype]
    assert_close_to(weights @ matrix64, result64, rtol=tolerance, scale=matrix64.abs().max().item())
    assert weights.min().item() >= -tolerance, weights
    assert abs(weights.sum().item() - 1.0) <= tolerance, weights


def _check_grad_drop(result: Tensor, matrix: Tensor) -> None:
    """Without leak, each entry of the result is the sum of the positive entries of its column
    or the sum of the negative ones (or zero, when neither is kept)."""
    matrix64 = matrix.detach().cpu().double()
    result64 = result.detach().cpu().double()
    positive = matrix64.clamp_min(0.0).sum(dim=0)
    negative = matrix64.clamp_max(0.0).sum(dim=0)
    tolerance = RTOL[result.dtype] * matrix64.abs().sum().item()
    distance = torch.stack(
        [(result64 - positive).abs(), (result64 - negative).abs(), result64.abs()]
    ).amin(dim=0)
    assert distance.max().item() <= tolerance, (result64, positive, negative)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("matrix_name", list(_MATRICES))
@pytest.mark.parametrize("name", list(_AGGREGATORS))
def test_aggregator(name: str, matrix_name: str, dtype: torch.dtype, device: str) -> None:
    reference_matrix = _MATRICES[matrix_name]()
    m = reference_matrix.shape[0]
    make = _AGGREGATORS[name]
    matrix = reference_matrix.to(device=device, dtype=dtype)
    result = _call(make(m, dtype, device), matrix)
    assert_on(result, device, dtype)
    assert result.shape == (reference_matrix.shape[1],)
    if name == "Random":
        _check_random_combination(result, matrix)
    elif name == "GradDrop":
        _check_grad_drop(result, matrix)
    else:
        reference = _call(make(m, torch.float64, "cpu"), reference_matrix)
        # Relative to the result and to the rows it combines, as rounding errors are.
        scale = reference.abs().max().item() + reference_matrix.abs().max().item()
        assert_close_to(result, reference, rtol=RTOL[dtype], scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("matrix_name", list(_MATRICES))
@pytest.mark.parametrize("name", list(_WEIGHTINGS))
def test_weighting(name: str, matrix_name: str, dtype: torch.dtype, device: str) -> None:
    reference_matrix = _MATRICES[matrix_name]()
    m = reference_matrix.shape[0]
    reference_gramian = reference_matrix @ reference_matrix.T
    make = _WEIGHTINGS[name]
    gramian = reference_gramian.to(device=device, dtype=dtype)
    weights = _call(make(m, dtype, device), gramian)
    assert_on(weights, device, dtype)
    assert weights.shape == (m,)
    if name == "RandomWeighting":
        weights64 = weights.cpu().double()
        assert weights64.min().item() > 0.0, weights64
        assert abs(weights64.sum().item() - 1.0) <= 10 * RTOL[dtype], weights64
    else:
        reference = _call(make(m, torch.float64, "cpu"), reference_gramian)
        # The weights are of order one for these Gramians; the scale also covers zero weights.
        scale = reference.abs().max().item() + 1.0
        assert_close_to(weights, reference, rtol=RTOL[dtype], scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_flattening(dtype: torch.dtype, device: str) -> None:
    jacobian = _conflicting().reshape(2, 4, 12)
    reference_gramian = torch.einsum("abn,cdn->abdc", jacobian, jacobian)
    flattening = aggregation.Flattening(aggregation.UPGradWeighting())
    weights = flattening(reference_gramian.to(device=device, dtype=dtype))
    assert_on(weights, device, dtype)
    reference = flattening(reference_gramian)
    assert weights.shape == reference.shape == (2, 4)
    assert_close_to(weights, reference, rtol=RTOL[dtype], scale=reference.abs().max().item() + 1.0)
