from __future__ import annotations

import pytest
import torch
from _asserts import (
    assert_close,
    assert_non_differentiable,
    assert_returns_row_for_single_row,
    assert_weighting_permutation_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import G_BASE, J_BASE, NONZERO_KINDS, SCALES, matrices, sample, sample_matrix
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import DualProj, DualProjWeighting
from torchjd.aggregation._dual_cone import solve_dual_cone_qp


def test_reference_values() -> None:
    assert_close(DualProj()(J_BASE), torch.tensor([0.5563, 1.1109, 1.1109]), atol=1e-4)
    assert_close(DualProjWeighting()(G_BASE), torch.tensor([0.6109, 0.5000]), atol=1e-4)
    assert_close(DualProj().weighting(J_BASE), torch.tensor([0.6109, 0.5000]), atol=1e-4)
    with_pref = DualProj(torch.tensor([1.0, 2.0]))(J_BASE)
    assert_close(with_pref, torch.tensor([2.2253, 4.4437, 4.4437]), atol=1e-4)


def test_repr_str_and_attributes() -> None:
    assert repr(DualProj()) == (
        "DualProj(pref_vector=None, norm_eps=0.0001, reg_eps=0.0001, solver='active_set')"
    )
    pref = torch.tensor([1.0, 2.0])
    aggregator = DualProj(pref, norm_eps=0.5, reg_eps=0.25)
    assert repr(aggregator) == (
        "DualProj(pref_vector=tensor([1., 2.]), norm_eps=0.5, reg_eps=0.25, solver='active_set')"
    )
    assert str(DualProj()) == "DualProj"
    assert str(aggregator) == "DualProj([1., 2.])"
    weighting = aggregator.gramian_weighting
    assert isinstance(weighting, DualProjWeighting)
    assert (weighting.norm_eps, weighting.reg_eps, weighting.solver) == (0.5, 0.25, "active_set")
    assert weighting._pref_vector is pref
    assert repr(DualProjWeighting()) == "DualProjWeighting(\n  (weighting): MeanWeighting()\n)"


def test_bad_parameters_are_rejected() -> None:
    for factory in (DualProj, DualProjWeighting):
        with pytest.raises(ValueError, match="'active_set', 'quadprog'"):
            factory(solver="osqp")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="reg_eps"):
            factory(reg_eps=-0.1)
    with pytest.raises(ValueError, match="square"):
        DualProjWeighting()(torch.ones(3))
    with pytest.raises(ZeroDivisionError):
        DualProj()(torch.zeros(0, 2))


@settings(max_examples=30, deadline=None)
@given(matrices(max_rows=64, max_cols=48, kinds=NONZERO_KINDS, scales=SCALES))
def test_non_conflicting_projection_of_the_mean(matrix: Tensor) -> None:
    for reg_eps in (1e-4, 0.0):
        weights = DualProj(norm_eps=0.0, reg_eps=reg_eps).weighting(matrix)
        # v ≥ u: the mean's weights are kept or increased.
        assert (weights >= 1 / matrix.shape[0]).all()
        products = matrix @ (weights @ matrix)
        bound = (reg_eps + 1e-11) * matrix.square().sum().item() * weights.max().item()
        assert products.min().item() >= -bound


def test_weights_are_the_projection_of_the_preference() -> None:
    matrix = sample_matrix(12, 20, rank=6, seed=0)
    gramian = matrix @ matrix.T
    pref = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    normalized = gramian / gramian.trace() + 1e-4 * torch.eye(12, dtype=torch.float64)
    expected = solve_dual_cone_qp(pref, normalized)
    assert_close(DualProjWeighting(pref)(gramian), expected, atol=0.0, rtol=1e-12)
    assert_weighting_permutation_equivariant(DualProjWeighting(), gramian, rtol=1e-10)


def test_degenerate_matrices() -> None:
    assert_returns_row_for_single_row(DualProj(), torch.tensor([3.0, -1.0, 2.0]))
    assert_zero_for_zero_matrix(DualProj(), 3, 5)
    tiny = 1e-3 * J_BASE.double()
    assert torch.equal(DualProj()(tiny), tiny.mean(dim=0))
    pref = torch.tensor([1.0, -2.0, 0.5])
    assert_close(DualProjWeighting(pref)(torch.zeros(3, 3)), pref.clamp_min(0.0), atol=1e-6)
    for kind in ("rank_one", "duplicated", "non_conflicting"):
        matrix = sample(kind, 9, 4, seed=1)  # type: ignore[arg-type]
        assert torch.isfinite(DualProj(reg_eps=0.0)(matrix)).all()
    non_conflicting = sample("non_conflicting", 7, 5, seed=2)
    assert_close(DualProj()(non_conflicting), non_conflicting.mean(dim=0), atol=0.0, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    matrix = sample_matrix(5, 7, seed=2)
    expected = DualProj()(matrix)
    result = DualProj()(matrix.to(dtype))
    assert result.dtype == dtype
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}.get(dtype, 1e-12)
    assert_close(result.double(), expected, atol=0.0, rtol=tolerance)


def test_not_differentiable() -> None:
    assert_non_differentiable(DualProj(), J_BASE)
    assert not DualProjWeighting()(G_BASE.clone().requires_grad_(True)).requires_grad


def test_quadprog_solver_gives_the_same_results() -> None:
    pytest.importorskip("quadprog")
    expected = torch.tensor([0.5563, 1.1109, 1.1109])
    assert_close(DualProj(solver="quadprog")(J_BASE), expected, atol=1e-4)
    for seed, kind in enumerate(("full", "low_rank", "duplicated")):
        matrix = sample(kind, 16, 10, scale=10.0 ** (4 * seed - 4), seed=seed)  # type: ignore[arg-type]
        expected = DualProj(solver="quadprog").weighting(matrix)
        assert_close(DualProj().weighting(matrix), expected, atol=0.0, rtol=1e-9)
