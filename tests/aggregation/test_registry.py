"""Contracts that every class exported by ``torchjd.aggregation`` must satisfy.

Each exported class has one entry in ``_ENTRIES`` (a test fails if one is missing), giving a factory
of sample instances and the facts the spec states about it. Aggregators are checked on matrices,
weightings on Gramians, and ``Flattening`` on generalized Gramians.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _asserts import assert_close
from _matrices import generalized_gramian
from torch import Tensor, nn

import torchjd.aggregation as aggregation
from torchjd.aggregation import NonDifferentiableError

# (m, dtype, device) -> instance. The dtype and device only matter for classes that store tensors
# that are returned or used as they are (Constant).
Factory = Callable[[int, torch.dtype, torch.device], nn.Module]

_DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_NOT_INSTANTIABLE = {"Aggregator", "Weighting", "GeneralizedWeighting", "NonDifferentiableError"}
_DRAWS_IN_INPUT_DTYPE = {"GradDrop", "Random"}

# Small integers: exact in every dtype, with conflicting rows and no ties between rows.
_MATRIX = torch.tensor(
    [
        [2.0, -1.0, 0.0, 3.0],
        [-1.0, 2.0, 1.0, 0.0],
        [1.0, 1.0, -2.0, 1.0],
        [0.0, -1.0, 2.0, 2.0],
        [3.0, 0.0, 1.0, -1.0],
    ]
)
_M, _N = _MATRIX.shape


@dataclass(frozen=True)
class _Entry:
    kind: str  # "aggregator", "weighting" (takes a Gramian) or "generalized"
    make: Factory
    repr_pattern: str  # regular expression for the repr of make(2, float32, cpu)
    str_text: str  # exact str of make(2, float32, cpu)
    single_row: bool = True  # a 1-row matrix aggregates to its row (spec §3.5)
    differentiable: bool = True  # no NonDifferentiableError hook (spec §3.2)


def _constant(m: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    return aggregation.Constant(torch.arange(1, m + 1, dtype=dtype, device=device))


def _constant_weighting(m: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    return aggregation.ConstantWeighting(torch.arange(1, m + 1, dtype=dtype, device=device))


def _simple(name: str, *args: object, **kwargs: object) -> Factory:
    return lambda _m, _dtype, _device: getattr(aggregation, name)(*args, **kwargs)


def _dual_cone_repr(name: str) -> str:
    return rf"{name}\(pref_vector=None, norm_eps=0\.0001, reg_eps=0\.0001, solver='\w+'\)"


def _module_repr(name: str, child: str | None = None) -> str:
    if child is None:
        return re.escape(f"{name}()")
    return re.escape(f"{name}(\n  (weighting): {child}()\n)")


_ENTRIES: dict[str, _Entry] = {
    "UPGrad": _Entry(
        "aggregator", _simple("UPGrad"), _dual_cone_repr("UPGrad"), "UPGrad", differentiable=False
    ),
    "UPGradWeighting": _Entry(
        "weighting",
        _simple("UPGradWeighting"),
        _module_repr("UPGradWeighting", "MeanWeighting"),
        "UPGradWeighting(\n  (weighting): MeanWeighting()\n)",
    ),
    "DualProj": _Entry(
        "aggregator",
        _simple("DualProj"),
        _dual_cone_repr("DualProj"),
        "DualProj",
        differentiable=False,
    ),
    "DualProjWeighting": _Entry(
        "weighting",
        _simple("DualProjWeighting"),
        _module_repr("DualProjWeighting", "MeanWeighting"),
        "DualProjWeighting(\n  (weighting): MeanWeighting()\n)",
    ),
    "AlignedMTL": _Entry(
        "aggregator", _simple("AlignedMTL"), re.escape("AlignedMTL(pref_vector=None)"), "AlignedMTL"
    ),
    "AlignedMTLWeighting": _Entry(
        "weighting",
        _simple("AlignedMTLWeighting"),
        _module_repr("AlignedMTLWeighting", "MeanWeighting"),
        "AlignedMTLWeighting(\n  (weighting): MeanWeighting()\n)",
    ),
    "CAGrad": _Entry(
        "aggregator",
        _simple("CAGrad", c=0.5),
        re.escape("CAGrad(c=0.5, norm_eps=0.0001)"),
        "CAGrad0.5",
        # Not asserted: with one row, the spec's formula gives (1 + c) times the row, while §3.5
        # says "that row"; the owner of CAGrad settles it.
        single_row=False,
        differentiable=False,
    ),
    "CAGradWeighting": _Entry(
        "weighting",
        _simple("CAGradWeighting", c=0.5),
        _module_repr("CAGradWeighting"),
        "CAGradWeighting()",
    ),
    "ConFIG": _Entry(
        "aggregator",
        _simple("ConFIG"),
        re.escape("ConFIG(pref_vector=None)"),
        "ConFIG",
        differentiable=False,
    ),
    "Constant": _Entry(
        "aggregator",
        _constant,
        re.escape("Constant(weights=tensor([1., 2.]))"),
        "Constant([1., 2.])",
    ),
    "ConstantWeighting": _Entry(
        "weighting", _constant_weighting, _module_repr("ConstantWeighting"), "ConstantWeighting()"
    ),
    "GradDrop": _Entry(
        "aggregator",
        _simple("GradDrop"),
        r"GradDrop\(f=<function _identity at 0x[0-9a-fA-F]+>, leak=None\)",
        "GradDrop",
        differentiable=False,
    ),
    "IMTLG": _Entry(
        "aggregator", _simple("IMTLG"), re.escape("IMTLG()"), "IMTLG", differentiable=False
    ),
    "IMTLGWeighting": _Entry(
        "weighting", _simple("IMTLGWeighting"), _module_repr("IMTLGWeighting"), "IMTLGWeighting()"
    ),
    "Krum": _Entry(
        "aggregator",
        _simple("Krum", 1, 2),
        re.escape("Krum(n_byzantine=1, n_selected=2)"),
        "Krum1-2",
        single_row=False,
    ),
    "KrumWeighting": _Entry(
        "weighting",
        _simple("KrumWeighting", 1, 2),
        _module_repr("KrumWeighting"),
        "KrumWeighting()",
    ),
    "Mean": _Entry("aggregator", _simple("Mean"), re.escape("Mean()"), "Mean"),
    "MeanWeighting": _Entry(
        "weighting", _simple("MeanWeighting"), _module_repr("MeanWeighting"), "MeanWeighting()"
    ),
    "MGDA": _Entry(
        "aggregator", _simple("MGDA"), re.escape("MGDA(epsilon=0.001, max_iters=100)"), "MGDA"
    ),
    "MGDAWeighting": _Entry(
        "weighting", _simple("MGDAWeighting"), _module_repr("MGDAWeighting"), "MGDAWeighting()"
    ),
    "NashMTL": _Entry(
        "aggregator",
        lambda m, _dtype, _device: aggregation.NashMTL(n_tasks=m),
        re.escape("NashMTL(n_tasks=2, max_norm=1.0, update_weights_every=1, optim_niter=20)"),
        "NashMTL",
        single_row=False,  # NashMTL does not support one row (spec §3.3)
        differentiable=False,
    ),
    "PCGrad": _Entry(
        "aggregator", _simple("PCGrad"), re.escape("PCGrad()"), "PCGrad", differentiable=False
    ),
    "PCGradWeighting": _Entry(
        "weighting",
        _simple("PCGradWeighting"),
        _module_repr("PCGradWeighting"),
        "PCGradWeighting()",
    ),
    "Random": _Entry("aggregator", _simple("Random"), re.escape("Random()"), "Random"),
    "RandomWeighting": _Entry(
        "weighting",
        _simple("RandomWeighting"),
        _module_repr("RandomWeighting"),
        "RandomWeighting()",
    ),
    "Sum": _Entry("aggregator", _simple("Sum"), re.escape("Sum()"), "Sum"),
    "SumWeighting": _Entry(
        "weighting", _simple("SumWeighting"), _module_repr("SumWeighting"), "SumWeighting()"
    ),
    "TrimmedMean": _Entry(
        "aggregator",
        _simple("TrimmedMean", 1),
        re.escape("TrimmedMean(trim_number=1)"),
        "TM1",
        single_row=False,
    ),
    "Flattening": _Entry(
        "generalized",
        lambda _m, _dtype, _device: aggregation.Flattening(aggregation.MeanWeighting()),
        _module_repr("Flattening", "MeanWeighting"),
        "Flattening(\n  (weighting): MeanWeighting()\n)",
    ),
}

_EXPORTED = [name for name in aggregation.__all__ if name not in _NOT_INSTANTIABLE]
_AGGREGATORS = [
    name for name in _EXPORTED if _ENTRIES.get(name) and _ENTRIES[name].kind == "aggregator"
]
_WEIGHTINGS = [
    name for name in _EXPORTED if _ENTRIES.get(name) and _ENTRIES[name].kind == "weighting"
]


def _make(
    name: str, m: int = _M, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> nn.Module:
    return _ENTRIES[name].make(m, dtype, device or torch.device("cpu"))


def _call(name: str, instance: nn.Module, stat: Tensor) -> Tensor:
    torch.manual_seed(0)  # the same draws for the random methods, whatever the dtype
    return instance(stat)


def test_every_exported_class_has_an_entry() -> None:
    missing = [name for name in _EXPORTED if name not in _ENTRIES]
    assert not missing, f"add registry entries for {missing}"
    for name in _NOT_INSTANTIABLE & set(aggregation.__all__):
        assert getattr(aggregation, name) is not None


@pytest.mark.parametrize("name", _EXPORTED)
def test_repr_and_str(name: str) -> None:
    entry = _ENTRIES[name]
    instance = entry.make(2, torch.float32, torch.device("cpu"))
    assert re.fullmatch(entry.repr_pattern, repr(instance)), repr(instance)
    assert str(instance) == entry.str_text


@pytest.mark.parametrize("name", _AGGREGATORS)
def test_aggregators_have_no_parameters_nor_buffers(name: str) -> None:
    instance = _make(name)
    assert list(instance.parameters()) == []
    assert list(instance.buffers()) == []


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("name", _AGGREGATORS)
def test_aggregator_dtypes(name: str, dtype: torch.dtype) -> None:
    matrix = _MATRIX.to(dtype)
    result = _call(name, _make(name, dtype=dtype), matrix)
    assert result.shape == (_N,)
    assert result.dtype == dtype
    assert torch.isfinite(result).all()
    # Random methods draw in the input's dtype (float32 for float16/bfloat16): float64 draws
    # differ from float32 ones, so only low-precision results are compared to float32 ones there.
    if dtype == torch.float64 and name in _DRAWS_IN_INPUT_DTYPE:
        return
    reference = _call(name, _make(name, dtype=torch.float32), _MATRIX).double()
    if dtype in (torch.float32, torch.float64):
        assert_close(result.double(), reference, atol=1e-4, rtol=1e-4)
    else:
        scale = reference.abs().max().item() + _MATRIX.abs().max().item()
        assert_close(result.double(), reference, atol=0.0, rtol=5e-2, scale=scale)


@pytest.mark.parametrize("device", _DEVICES, ids=str)
@pytest.mark.parametrize("name", _AGGREGATORS)
def test_aggregator_device(name: str, device: torch.device) -> None:
    matrix = _MATRIX.to(device)
    result = _call(name, _make(name, device=device), matrix)
    assert result.device == matrix.device
    assert result.shape == (_N,)


@pytest.mark.parametrize("name", _AGGREGATORS)
def test_aggregator_empty_columns(name: str) -> None:
    result = _call(name, _make(name), torch.zeros(_M, 0))
    assert result.shape == (0,)


@pytest.mark.parametrize("name", _AGGREGATORS)
def test_aggregator_zero_matrix(name: str) -> None:
    result = _call(name, _make(name), torch.zeros(_M, _N))
    assert torch.equal(result, torch.zeros(_N)), result


@pytest.mark.parametrize("name", [name for name in _AGGREGATORS if _ENTRIES[name].single_row])
def test_aggregator_single_row(name: str) -> None:
    row = _MATRIX[:1]
    result = _call(name, _make(name, m=1), row)
    assert_close(result, row[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", _AGGREGATORS)
def test_aggregator_differentiability(name: str) -> None:
    matrix = _MATRIX.clone().requires_grad_(True)
    result = _call(name, _make(name), matrix)
    assert result.requires_grad
    if _ENTRIES[name].differentiable:
        (gradient,) = torch.autograd.grad(result.sum(), matrix)
        assert gradient.shape == matrix.shape
        assert torch.isfinite(gradient).all()
    else:
        with pytest.raises(NonDifferentiableError):
            result.sum().backward()


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("name", _WEIGHTINGS)
def test_weighting_dtypes(name: str, dtype: torch.dtype) -> None:
    gramian = (_MATRIX @ _MATRIX.T / 10).to(dtype)
    weights = _call(name, _make(name, dtype=dtype), gramian)
    assert weights.shape == (_M,)
    assert weights.dtype == dtype
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("device", _DEVICES, ids=str)
@pytest.mark.parametrize("name", _WEIGHTINGS)
def test_weighting_device(name: str, device: torch.device) -> None:
    gramian = (_MATRIX @ _MATRIX.T).to(device)
    weights = _call(name, _make(name, device=device), gramian)
    assert weights.device == gramian.device
    assert weights.shape == (_M,)


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("device", _DEVICES, ids=str)
def test_flattening(device: torch.device, dtype: torch.dtype) -> None:
    if "Flattening" not in _EXPORTED:
        pytest.fail("Flattening is not exported")
    jacobian = _MATRIX.reshape(5, 1, 4).expand(5, 2, 4).to(device=device, dtype=dtype)
    weights = _make("Flattening")(generalized_gramian(jacobian))
    assert weights.shape == (5, 2)
    assert weights.dtype == dtype
    assert weights.device == jacobian.device
