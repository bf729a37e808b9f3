from __future__ import annotations

import pytest
import torch
from _asserts import (
    assert_close,
    assert_linear_under_scaling,
    assert_non_differentiable,
    assert_returns_row_for_single_row,
    assert_weighting_permutation_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import G_BASE, J_BASE, NONZERO_KINDS, SCALES, matrices, sample, sample_matrix
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import Flattening, PCGradWeighting, UPGrad, UPGradWeighting


def _conflict_bound(matrix: Tensor, weights: Tensor, reg_eps: float) -> float:
    """How negative ``matrix @ aggregation`` may be. With ``G' = G / tr(G) + ε I``, each
    projection ``v`` satisfies ``G' v ≥ 0``, so ``G w ≥ −ε tr(G) w`` for ``w = Σ v ≥ 0``; on top of
    that, rounding errors of the order of ``ε_64 ‖J‖²_F max w``."""
    squared_norm = matrix.square().sum().item()
    return (reg_eps + 1e-11) * squared_norm * weights.abs().max().item()


def test_reference_values() -> None:
    assert_close(UPGrad()(J_BASE), torch.tensor([0.2929, 1.9004, 1.9004]), atol=1e-4)
    assert_close(UPGradWeighting()(G_BASE), torch.tensor([1.1109, 0.7894]), atol=1e-4)
    assert_close(UPGrad().weighting(J_BASE), torch.tensor([1.1109, 0.7894]), atol=1e-4)
    with_pref = UPGrad(torch.tensor([1.0, 2.0]))(J_BASE)
    assert_close(with_pref, torch.tensor([1.6984, 6.0225, 6.0225]), atol=1e-4)
    flattened = Flattening(UPGradWeighting())(torch.ones(2, 3, 3, 2))
    assert_close(flattened, torch.full((2, 3), 1 / 6), atol=1e-4)


def test_repr_str_and_attributes() -> None:
    assert repr(UPGrad()) == (
        "UPGrad(pref_vector=None, norm_eps=0.0001, reg_eps=0.0001, solver='active_set')"
    )
    pref = torch.tensor([1.0, 2.0, 3.0])
    aggregator = UPGrad(pref, norm_eps=0.01, reg_eps=0.0, solver="active_set")
    assert repr(aggregator) == (
        "UPGrad(pref_vector=tensor([1., 2., 3.]), norm_eps=0.01, reg_eps=0.0, solver='active_set')"
    )
    assert str(UPGrad()) == "UPGrad"
    assert str(aggregator) == "UPGrad([1., 2., 3.])"
    weighting = aggregator.gramian_weighting
    assert isinstance(weighting, UPGradWeighting)
    assert (weighting.norm_eps, weighting.reg_eps, weighting.solver) == (0.01, 0.0, "active_set")
    assert weighting._pref_vector is pref
    assert repr(UPGradWeighting()) == "UPGradWeighting(\n  (weighting): MeanWeighting()\n)"
    assert repr(UPGradWeighting(pref)) == (
        "UPGradWeighting(\n  (weighting): ConstantWeighting()\n)"
    )
    assert repr(UPGrad().weighting) == (
        "_Composition(\n  (weighting): UPGradWeighting(\n    (weighting): MeanWeighting()\n  )\n)"
    )


def test_bad_parameters_are_rejected_at_construction() -> None:
    for factory in (UPGrad, UPGradWeighting):
        with pytest.raises(ValueError, match="'active_set', 'quadprog'"):
            factory(solver="cvxopt")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="norm_eps"):
            factory(norm_eps=-1.0)
        with pytest.raises(ValueError, match="reg_eps"):
            factory(reg_eps=float("nan"))
        with pytest.raises(ValueError, match="pref_vector"):
            factory(torch.ones(2, 2))


def test_bad_gramians_are_rejected() -> None:
    with pytest.raises(ValueError, match="square"):
        UPGradWeighting()(torch.ones(2, 3))
    with pytest.raises(ValueError, match="rows"):
        UPGradWeighting(torch.ones(3))(torch.eye(2))
    with pytest.raises(ZeroDivisionError):
        UPGrad()(torch.zeros(0, 3))


@settings(max_examples=30, deadline=None)
@given(matrices(max_rows=64, max_cols=48, kinds=NONZERO_KINDS, scales=SCALES))
def test_non_conflicting(matrix: Tensor) -> None:
    # norm_eps=0: tiny matrices are not treated as zero (where UPGrad is the mean).
    for reg_eps in (1e-4, 0.0):
        weights = UPGrad(norm_eps=0.0, reg_eps=reg_eps).weighting(matrix)
        products = matrix @ (weights @ matrix)
        assert products.min().item() >= -_conflict_bound(matrix, weights, reg_eps)
        assert (weights >= 0).all()


@settings(max_examples=15, deadline=None)
@given(matrices(max_rows=12, max_cols=12, kinds=("full",), scales=SCALES))
def test_linear_under_scaling(matrix: Tensor) -> None:
    # Exact without regularisation (and normalisation does not change the projections).
    if matrix.shape[0] <= matrix.shape[1]:
        assert_linear_under_scaling(UPGrad(norm_eps=0.0, reg_eps=0.0), matrix, rtol=1e-8)


def test_matches_pcgrad_on_two_rows() -> None:
    # For two rows, projecting each onto the normal plane of the other when they conflict is the
    # projection onto the dual cone.
    for seed in range(20):
        gramian = sample_matrix(2, 5, seed=seed) @ sample_matrix(2, 5, seed=seed).T
        expected = PCGradWeighting()(gramian)
        actual = UPGradWeighting(torch.ones(2, dtype=torch.float64), norm_eps=0, reg_eps=0)(gramian)
        assert_close(actual, expected, atol=0.0, rtol=1e-10)


def test_weights_are_scale_invariant_and_permutation_equivariant() -> None:
    matrix = sample_matrix(20, 30, rank=8, seed=1)
    gramian = matrix @ matrix.T
    weights = UPGradWeighting()(gramian)
    for factor in (1e-2, 1e9):
        assert_close(UPGradWeighting()(factor * gramian), weights, atol=0.0, rtol=1e-12)
    assert_weighting_permutation_equivariant(UPGradWeighting(), gramian, rtol=1e-10)


def test_tiny_and_zero_jacobians_give_the_preference_weights() -> None:
    # trace(G) < norm_eps: the normalised Gramian is zero, the projection keeps u.
    tiny = 1e-3 * J_BASE.double()
    assert torch.equal(UPGradWeighting()(tiny @ tiny.T), torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.equal(UPGrad()(tiny), tiny.mean(dim=0))
    assert_zero_for_zero_matrix(UPGrad(), 4, 3)
    pref = torch.tensor([1.0, -2.0, 0.5])
    # With reg_eps > 0, G' = reg_eps I: the projection of u_i e_i is its non-negative part.
    assert_close(UPGradWeighting(pref)(torch.zeros(3, 3)), pref.clamp_min(0.0), atol=1e-6)


def test_degenerate_matrices() -> None:
    assert_returns_row_for_single_row(UPGrad(), torch.tensor([3.0, -1.0, 2.0]))
    huge = torch.tensor([1e-30, 1e30], dtype=torch.float64)
    assert_returns_row_for_single_row(UPGrad(), huge, rtol=1e-12)
    for kind in ("rank_one", "duplicated"):
        for scale in (1e-12, 1e12):
            matrix = sample(kind, 10, 6, scale=scale, seed=3)  # type: ignore[arg-type]
            for reg_eps in (1e-4, 0.0):
                weights = UPGrad(norm_eps=0.0, reg_eps=reg_eps).weighting(matrix)
                products = matrix @ (weights @ matrix)
                assert torch.isfinite(weights).all()
                assert products.min().item() >= -_conflict_bound(matrix, weights, reg_eps)
    # Two identical rows: each projection is the row itself, UPGrad is their mean.
    row = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    assert_close(UPGrad()(torch.cat([row, row])), row[0], atol=0.0, rtol=1e-12)


def test_pref_vectors() -> None:
    matrix = sample_matrix(6, 8, seed=4)
    pref = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    weights = UPGradWeighting(pref)(matrix @ matrix.T)
    # Each projection of u_i e_i is u_i times that of e_i: the weights are linear in positive u.
    unit = UPGradWeighting(torch.ones(6, dtype=torch.float64))
    per_row = [
        UPGradWeighting(torch.eye(6, dtype=torch.float64)[i])(matrix @ matrix.T) for i in range(6)
    ]
    assert_close(weights, sum(p * w for p, w in zip(pref, per_row)), atol=0.0, rtol=1e-10)
    assert_close(unit(matrix @ matrix.T), sum(per_row), atol=0.0, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    matrix = sample_matrix(5, 7, seed=2)
    expected = UPGrad()(matrix)
    result = UPGrad()(matrix.to(dtype))
    assert result.dtype == dtype
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}.get(dtype, 1e-12)
    assert_close(result.double(), expected, atol=0.0, rtol=tolerance)
    weights = UPGradWeighting()((matrix @ matrix.T).to(dtype))
    assert weights.dtype == dtype


def test_not_differentiable() -> None:
    assert_non_differentiable(UPGrad(), J_BASE)
    gramian = G_BASE.clone().requires_grad_(True)
    assert not UPGradWeighting()(gramian).requires_grad


def test_quadprog_solver_gives_the_same_results() -> None:
    pytest.importorskip("quadprog")
    assert repr(UPGrad(solver="quadprog")).endswith("solver='quadprog')")
    assert_close(
        UPGrad(solver="quadprog")(J_BASE), torch.tensor([0.2929, 1.9004, 1.9004]), atol=1e-4
    )
    for seed, kind in enumerate(("full", "low_rank", "duplicated")):
        matrix = sample(kind, 16, 10, scale=10.0 ** (4 * seed - 4), seed=seed)  # type: ignore[arg-type]
        expected = UPGrad(solver="quadprog").weighting(matrix)
        assert_close(UPGrad().weighting(matrix), expected, atol=0.0, rtol=1e-9)
