"""The dual-cone solver, UPGrad and DualProj on every device, against the CPU float64 result.

On the CPU, the solver takes its CPU paths (lean small paths, gathered systems); on other devices,
its masked path (full-size systems, a few host reads). Both must give the minimiser: the result is
checked against the optimality (KKT) conditions and against the CPU result, for Gramians of random
rows and of conflicting rows (rows minus 0.8 times their mean, as per-sample gradients are).
"""

from __future__ import annotations

import pytest
import torch
from _device_utils import DEVICES, RTOL, assert_close_to, assert_on
from torch import Tensor

from torchjd.aggregation import DualProj, UPGrad
from torchjd.aggregation._dual_cone import solve_dual_cone_qp

_SIZES = [3, 40, 200]
_KINDS = ["random", "conflicting"]
_DTYPES = [torch.float64, torch.float32]


def _jacobian(m: int, kind: str) -> Tensor:
    generator = torch.Generator().manual_seed(m)
    rows = torch.randn(m, m + 8, generator=generator, dtype=torch.float64)
    if kind == "conflicting":
        rows = rows - 0.8 * rows.mean(dim=0)
    return rows


def _lower_bounds(m: int) -> Tensor:
    """UPGrad's problems (``u = e_i / m``) and DualProj's (``u = 1 / m``)."""
    identity = torch.eye(m, dtype=torch.float64)
    return torch.cat([identity, torch.ones(1, m, dtype=torch.float64)]) / m


def _assert_kkt(solution: Tensor, lower: Tensor, gramian: Tensor, rtol: float) -> None:
    """``v ≥ u`` exactly; ``y = G v ≥ 0`` and, entry-wise, ``x = v − u = 0`` or ``y = 0``, up
    to ``rtol`` times the natural scales of ``x`` and ``y``."""
    solution = solution.detach().cpu().double()
    assert (solution >= lower).all(), (solution - lower).min()
    offsets = solution - lower
    products = solution @ gramian
    root_diagonal = gramian.diagonal().sqrt()
    # |G_ij| <= s_i s_j: the entries of G v are at most s_i Σ_j s_j |v_j|.
    product_scale = (solution.abs() @ root_diagonal).unsqueeze(1) * root_diagonal
    offset_scale = solution.abs().amax(dim=1, keepdim=True)
    assert (products >= -rtol * product_scale).all(), (products / product_scale).min()
    slack = torch.minimum(offsets / offset_scale, products.abs() / product_scale)
    assert slack.max().item() <= rtol, slack.max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("m", _SIZES)
def test_solver(m: int, kind: str, device: str) -> None:
    jacobian = _jacobian(m, kind)
    gramian = jacobian @ jacobian.T
    lower = _lower_bounds(m)
    solution = solve_dual_cone_qp(lower.to(device), gramian.to(device))
    assert_on(solution, device, torch.float64)
    assert solution.shape == lower.shape
    _assert_kkt(solution, lower, gramian, rtol=1e-9)
    reference = solve_dual_cone_qp(lower, gramian)
    assert_close_to(solution, reference, rtol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("m", _SIZES)
@pytest.mark.parametrize("aggregator_class", [UPGrad, DualProj], ids=lambda cls: cls.__name__)
def test_aggregator(
    aggregator_class: type[UPGrad] | type[DualProj],
    m: int,
    kind: str,
    dtype: torch.dtype,
    device: str,
) -> None:
    reference_jacobian = _jacobian(m, kind)
    # Without regularisation (these Jacobians have full row rank), so that the result conflicts
    # with no row exactly; with `reg_eps`, it does so only in the regularised metric.
    aggregator = aggregator_class(reg_eps=0.0)
    jacobian = reference_jacobian.to(device=device, dtype=dtype)
    result = aggregator(jacobian)
    assert_on(result, device, dtype)
    reference = aggregator(reference_jacobian)
    scale = reference.abs().max().item() + reference_jacobian.abs().max().item()
    assert_close_to(result, reference, rtol=RTOL[dtype], scale=scale)
    # The aggregation conflicts with no row (up to rounding in the dtype of the input).
    products = reference_jacobian @ result.cpu().double()
    tolerance = RTOL[dtype] * reference_jacobian.square().sum(dim=1).max().item()
    assert products.min().item() >= -tolerance, products.min()
