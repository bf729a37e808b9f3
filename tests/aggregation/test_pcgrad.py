from __future__ import annotations

import pytest
import torch
from _asserts import (
    assert_close,
    assert_non_conflicting,
    assert_non_differentiable,
    assert_returns_row_for_single_row,
    assert_scale_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import G_BASE, J_BASE, SCALES, matrices, sample
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import PCGrad, PCGradWeighting, UPGradWeighting


def _pcgrad_weights_reference(gramian: Tensor) -> Tensor:
    """The spec's loop: one randperm per row, then sequential projections (m² Python steps)."""
    m = gramian.shape[0]
    weights = torch.zeros(m, dtype=gramian.dtype)
    for i in range(m):
        permutation = torch.randperm(m)
        coefficients = torch.zeros(m, dtype=gramian.dtype)
        coefficients[i] = 1
        for j in permutation.tolist():
            if j == i:
                continue
            inner_product = gramian[j] @ coefficients
            if inner_product < 0:
                coefficients[j] -= inner_product / gramian[j, j]
        weights += coefficients
    return weights


def _rng_state_after(draw: int, m: int, seed: int) -> Tensor:
    torch.manual_seed(seed)
    for _ in range(draw):
        torch.randperm(m)
    return torch.get_rng_state()


def test_reference_values() -> None:
    assert_close(PCGrad()(J_BASE), torch.tensor([0.5848, 3.8012, 3.8012]), atol=1e-4)
    assert_close(PCGradWeighting()(G_BASE), torch.tensor([2.2222, 1.5789]), atol=1e-4)


def test_edge_cases() -> None:
    assert torch.equal(PCGradWeighting()(torch.zeros(3, 3)), torch.ones(3))
    assert_zero_for_zero_matrix(PCGrad(), 3, 4)
    assert torch.equal(PCGrad()(torch.zeros(0, 3)), torch.zeros(3))
    assert PCGrad()(torch.zeros(3, 0)).shape == (0,)
    assert_returns_row_for_single_row(PCGrad(), torch.tensor([3.0, -1.0, 2.0]))


def test_repr() -> None:
    assert repr(PCGrad()) == "PCGrad()"
    assert str(PCGrad()) == "PCGrad"
    assert repr(PCGradWeighting()) == "PCGradWeighting()"


@settings(max_examples=30, deadline=None)
@given(matrices(min_rows=1, max_rows=10, max_cols=6, scales=SCALES))
def test_matches_sequential_reference_and_its_random_draws(matrix: Tensor) -> None:
    gramian = matrix @ matrix.T
    m = gramian.shape[0]
    torch.manual_seed(3)
    expected = _pcgrad_weights_reference(gramian)
    torch.manual_seed(3)
    actual = PCGradWeighting()(gramian)
    assert_close(actual, expected, atol=0.0, rtol=1e-9)
    # Exactly m draws of randperm(m) from the global generator.
    assert torch.equal(torch.get_rng_state(), _rng_state_after(m, m, seed=3))


@settings(max_examples=30, deadline=None)
@given(matrices(min_rows=2, max_rows=2, max_cols=6, scales=SCALES))
def test_two_rows_closed_form(matrix: Tensor) -> None:
    # Each row loses its component along the other one if they conflict; the results are summed.
    g1, g2 = matrix
    inner = g1 @ g2
    expected = g1 + g2
    if inner < 0:
        expected = expected - inner / (g2 @ g2) * g2 - inner / (g1 @ g1) * g1
    scale = matrix.abs().max().item()
    assert_close(PCGrad()(matrix), expected, atol=0.0, rtol=1e-9, scale=scale)
    assert_non_conflicting(PCGrad(), matrix, rtol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_two_rows_match_unprojected_upgrad(seed: int) -> None:
    # Known identity (spec §3.3): with two rows, PCGrad's weights are those of UPGrad with a
    # preference vector of ones and no normalisation nor regularisation.
    matrix = sample("full", 2, 5, seed=seed, dtype=torch.float32)
    gramian = matrix @ matrix.T
    expected = UPGradWeighting(torch.ones(2), norm_eps=0.0, reg_eps=0.0)(gramian)
    assert_close(PCGradWeighting()(gramian), expected, atol=4e-4)


@pytest.mark.parametrize("m", [128, pytest.param(512, marks=pytest.mark.slow)])
def test_many_rows(m: int) -> None:
    # m rows are handled in m vectorised steps (the reference would take m² Python steps);
    # exactness against the reference is checked on smaller problems above.
    matrix = sample("low_rank", m, 16, seed=0, dtype=torch.float32)
    torch.manual_seed(0)
    weights = PCGradWeighting()(matrix @ matrix.T)
    assert weights.shape == (m,)
    assert torch.isfinite(weights).all()
    assert torch.equal(torch.get_rng_state(), _rng_state_after(m, m, seed=0))


@settings(max_examples=15, deadline=None)
@given(matrices(min_rows=1, max_rows=16, max_cols=8, scales=SCALES))
def test_scale_equivariant_for_fixed_draws(matrix: Tensor) -> None:
    assert_scale_equivariant(PCGrad(), matrix, factors=(1e-3, 1e3), rtol=1e-9, seed=0)


def test_non_conflicting_rows_are_summed() -> None:
    matrix = sample("non_conflicting", 6, 4, seed=1)
    assert_close(PCGrad()(matrix), matrix.sum(dim=0), atol=0.0, rtol=1e-12)


def test_non_differentiable_but_weighting_keeps_history() -> None:
    assert_non_differentiable(PCGrad(), sample("full", 3, 4))
    gramian = G_BASE.clone().requires_grad_(True)
    weights = PCGradWeighting()(gramian)
    assert weights.requires_grad
    (gradient,) = torch.autograd.grad(weights.sum(), gramian)
    assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = PCGrad()(J_BASE.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.tensor([0.5848, 3.8012, 3.8012]).double(), atol=3e-2)
    weights = PCGradWeighting()(G_BASE.to(dtype))
    assert weights.dtype == dtype
    assert_close(weights.double(), torch.tensor([2.2222, 1.5789]).double(), atol=2e-2)
