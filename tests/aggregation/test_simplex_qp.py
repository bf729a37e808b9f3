from __future__ import annotations

import itertools

import pytest
import torch
from _matrices import ALL_KINDS, SCALES, matrices, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from torchjd.aggregation._simplex_qp import affine_minimizer, minimize_over_simplex

pytestmark = pytest.mark.usefixtures("one_thread")


def _objective(gramian: Tensor, linear: Tensor, weights: Tensor) -> float:
    return (0.5 * weights @ gramian @ weights + linear @ weights).item()


def _frank_wolfe_gap(gramian: Tensor, linear: Tensor, weights: Tensor) -> float:
    """``max_{v ∈ simplex} ∇f(w)ᵀ(w - v)``: an upper bound on ``f(w) - min f`` (convexity)."""
    gradient = gramian @ weights + linear
    return (weights @ gradient - gradient.min()).item()


def _brute_force_minimum(gramian: Tensor, linear: Tensor) -> float:
    """The smallest value of the objective over the stationary points of every face."""
    m = gramian.shape[0]
    best = float("inf")
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            index = torch.tensor(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=gramian.dtype)
            kkt[:size, :size] = gramian[index][:, index]
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = torch.cat([-linear[index], torch.ones(1, dtype=gramian.dtype)]).unsqueeze(1)
            solution = torch.linalg.lstsq(kkt, rhs, driver="gelsd").solution[:size, 0]
            if solution.min() < -1e-12 or abs(solution.sum().item() - 1.0) > 1e-9:
                continue
            weights = torch.zeros(m, dtype=gramian.dtype)
            weights[index] = solution
            best = min(best, _objective(gramian, linear, weights))
    return best


def _problem(matrix: Tensor, shift_scale: float, seed: int) -> tuple[Tensor, Tensor]:
    """``G = J Jᵀ`` and ``q = J v``: the projection of ``-v`` on the hull of the rows."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randn(matrix.shape[1], generator=generator, dtype=matrix.dtype)
    return matrix @ matrix.T, matrix @ (shift_scale * matrix.abs().max() * shift)


@settings(max_examples=40, deadline=None)
@given(
    matrices(min_rows=1, max_rows=6, max_cols=5, kinds=ALL_KINDS, scales=SCALES),
    st.sampled_from([0.0, 0.1, 1.0, 10.0]),
    st.integers(0, 1000),
)
def test_matches_brute_force(matrix: Tensor, shift_scale: float, seed: int) -> None:
    gramian, linear = _problem(matrix, shift_scale, seed)
    solution = minimize_over_simplex(gramian, linear)
    weights = solution.weights
    assert weights.min().item() >= 0.0
    assert abs(weights.sum().item() - 1.0) <= 1e-12
    scale = max(gramian.abs().max().item(), linear.abs().max().item(), 1e-300)
    assert _frank_wolfe_gap(gramian, linear, weights) <= 1e-10 * scale
    value = _objective(gramian, linear, weights)
    # The brute force can miss the minimum on rank-deficient faces, never undercut it.
    assert value <= _brute_force_minimum(gramian, linear) + 1e-10 * scale
    # Weights outside the support are zero.
    outside = [i for i in range(matrix.shape[0]) if i not in solution.support]
    assert torch.equal(weights[outside], torch.zeros(len(outside), dtype=weights.dtype))


@settings(max_examples=15, deadline=None)
@given(matrices(min_rows=8, max_rows=40, max_cols=12, kinds=ALL_KINDS), st.integers(0, 1000))
def test_optimal_and_affinely_independent_support_on_larger_problems(
    matrix: Tensor, seed: int
) -> None:
    gramian, linear = _problem(matrix, 0.5, seed)
    solution = minimize_over_simplex(gramian, linear)
    scale = max(gramian.abs().max().item(), linear.abs().max().item(), 1e-300)
    assert _frank_wolfe_gap(gramian, linear, solution.weights) <= 1e-10 * scale
    # The support points are affinely independent: [rows, 1] has full row rank.
    rows = matrix[list(solution.support)]
    lifted = torch.cat([rows, torch.ones(len(solution.support), 1, dtype=rows.dtype)], dim=1)
    assert torch.linalg.matrix_rank(lifted).item() == len(solution.support)


def test_warm_start_reaches_the_same_minimum() -> None:
    matrix = sample("low_rank", 12, 6, seed=4)
    gramian, linear = _problem(matrix, 0.3, 1)
    cold = minimize_over_simplex(gramian, linear)
    nearby = minimize_over_simplex(gramian, 1.5 * linear)
    warm = minimize_over_simplex(
        gramian, linear, initial_support=nearby.support, initial_weights=nearby.weights
    )
    scale = gramian.abs().max().item()
    warm_value = _objective(gramian, linear, warm.weights)
    assert abs(warm_value - _objective(gramian, linear, cold.weights)) <= 1e-12 * scale
    assert _frank_wolfe_gap(gramian, linear, warm.weights) <= 1e-10 * scale
    assert torch.allclose(matrix.T @ warm.weights, matrix.T @ cold.weights, atol=1e-9)


def test_known_minimum_norm_point() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    solution = minimize_over_simplex(matrix @ matrix.T)
    assert torch.allclose(solution.weights, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert sorted(solution.support) == [0, 1]


def test_zero_matrix_and_single_point() -> None:
    assert torch.equal(
        minimize_over_simplex(torch.zeros(3, 3, dtype=torch.float64)).weights.sum(),
        torch.tensor(1.0, dtype=torch.float64),
    )
    assert torch.equal(
        minimize_over_simplex(torch.tensor([[4.0]], dtype=torch.float64)).weights,
        torch.tensor([1.0], dtype=torch.float64),
    )


def test_affine_minimizer_is_stationary_on_the_hyperplane() -> None:
    matrix = sample("full", 4, 6, seed=2)
    gramian = matrix @ matrix.T
    linear = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    weights = affine_minimizer(gramian, linear)
    assert abs(weights.sum().item() - 1.0) <= 1e-12
    gradient = gramian @ weights + linear
    # Stationary under the constraint Σ w = 1: the gradient is a multiple of the ones vector.
    assert (gradient.max() - gradient.min()).item() <= 1e-10 * gradient.abs().max().item()
