from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from _asserts import (
    assert_close,
    assert_empty_columns,
    assert_non_conflicting,
    assert_non_differentiable,
    assert_output_like_input,
    assert_permutation_invariant,
    assert_scale_equivariant,
    assert_weighting_permutation_equivariant,
    assert_weights_like_input,
    assert_zero_for_zero_matrix,
)
from _matrices import G_BASE, J_BASE, NONZERO_KINDS, matrices, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import Tensor

from torchjd.aggregation import CAGrad, CAGradWeighting
from torchjd.aggregation._cagrad import _quadratic_roots, _solve_cagrad_subproblem

pytestmark = pytest.mark.usefixtures("one_thread")


class _Subproblem:
    """CAGrad's subproblem for ``matrix``: minimise ``g0ᵀx + s‖x‖`` over the combinations
    ``x = Aᵀw`` (``w`` in the simplex) of the rows of ``A``, the matrix normalised by its Frobenius
    norm; ``g0`` is the mean row and ``s = c ‖g0‖``. The objective is evaluated from ``A`` (not
    from the Gramian) to stay accurate when ``x`` is near the origin."""

    def __init__(self, matrix: Tensor, c: float) -> None:
        self.rows = matrix / matrix.norm()
        m = matrix.shape[0]
        self.mean_row = self.rows.T @ torch.full((m,), 1.0 / m, dtype=matrix.dtype)
        self.gramian = self.rows @ self.rows.T
        self.linear = self.rows @ self.mean_row
        self.radius = c * self.mean_row.norm().item()

    def objective(self, weights: Tensor) -> float:
        combination = self.rows.T @ weights
        return (self.mean_row @ combination + self.radius * combination.norm()).item()

    def solve(self) -> Tensor:
        return _solve_cagrad_subproblem(self.gramian, self.linear, self.radius, 1e-12)

    def scipy_minimum(self) -> tuple[float, Tensor]:
        """The best of SLSQP runs from the barycentre and from every vertex, made feasible."""
        rows, mean_row, m = self.rows.numpy(), self.mean_row.numpy(), self.rows.shape[0]

        def objective(w: np.ndarray) -> float:
            x = rows.T @ w
            return float(mean_row @ x + self.radius * np.linalg.norm(x))

        def gradient(w: np.ndarray) -> np.ndarray:
            x = rows.T @ w
            return rows @ (mean_row + self.radius * x / max(float(np.linalg.norm(x)), 1e-150))

        best_value, best_weights = math.inf, np.full(m, 1.0 / m)
        for start in [np.full(m, 1.0 / m), *np.eye(m)]:
            result = minimize(
                objective,
                start,
                jac=gradient,
                method="SLSQP",
                bounds=[(0.0, 1.0)] * m,
                constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                options={"ftol": 1e-15, "maxiter": 1000},
            )
            weights = np.clip(result.x, 0.0, None)
            weights = weights / weights.sum()
            value = objective(weights)
            if value < best_value:
                best_value, best_weights = value, weights
        return best_value, torch.from_numpy(best_weights)


def test_reference_values() -> None:
    assert_close(CAGrad(c=0.5)(J_BASE), torch.tensor([0.1835, 1.2041, 1.2041]), atol=1e-4)
    assert_close(CAGradWeighting(c=0.5)(G_BASE), torch.tensor([0.7041, 0.5000]), atol=1e-4)
    assert_close(CAGrad(c=0.5).weighting(J_BASE), torch.tensor([0.7041, 0.5000]), atol=1e-4)


def test_repr_str_and_attributes() -> None:
    assert repr(CAGrad(c=0.5)) == "CAGrad(c=0.5, norm_eps=0.0001)"
    assert repr(CAGrad(c=2, norm_eps=0.01)) == "CAGrad(c=2, norm_eps=0.01)"
    assert str(CAGrad(c=0.5)) == "CAGrad0.5"
    assert str(CAGrad(c=1.0)) == "CAGrad1."
    assert str(CAGrad(c=10)) == "CAGrad1"  # The original's quirk: "10".rstrip("0").
    weighting = CAGradWeighting(c=0.3, norm_eps=0.01)
    assert repr(weighting) == "CAGradWeighting()"
    assert (weighting.c, weighting.norm_eps) == (0.3, 0.01)
    assert isinstance(CAGrad(c=0.5).gramian_weighting, CAGradWeighting)


def test_negative_c_is_rejected_with_the_original_message() -> None:
    with pytest.raises(ValueError) as info:
        CAGrad(c=-1.0)
    assert str(info.value) == "Parameter `c` should be a non-negative float. Found `c = -1.0`."


@pytest.mark.parametrize("c", [float("nan"), float("inf"), "0.5", True, None])
def test_invalid_c_is_rejected(c: object) -> None:
    with pytest.raises(ValueError, match="Parameter `c` should be a non-negative float"):
        CAGradWeighting(c=c)  # type: ignore[arg-type]


@pytest.mark.parametrize("norm_eps", [-1e-4, float("nan"), "0"])
def test_invalid_norm_eps_is_rejected(norm_eps: object) -> None:
    with pytest.raises(ValueError, match="`norm_eps`"):
        CAGrad(c=0.5, norm_eps=norm_eps)  # type: ignore[arg-type]


def test_non_square_gramian_is_rejected() -> None:
    with pytest.raises(ValueError, match="`gramian`"):
        CAGradWeighting(c=0.5)(torch.ones(2, 3))


def test_non_differentiable() -> None:
    assert_non_differentiable(CAGrad(c=0.5), J_BASE)
    gramian = G_BASE.clone().requires_grad_(True)
    assert not CAGradWeighting(c=0.5)(gramian).requires_grad


def test_zero_tiny_and_empty_matrices() -> None:
    assert_zero_for_zero_matrix(CAGrad(c=0.5), 4, 3)
    assert_empty_columns(CAGrad(c=0.5), 3)
    # trace(G) = 56e-6 < norm_eps: the result is zero (spec: tiny Jacobian -> zero vector).
    assert torch.equal(CAGrad(c=0.5)(1e-3 * J_BASE), torch.zeros(3))
    assert torch.equal(CAGrad(c=0.5)(torch.zeros(0, 3)), torch.zeros(3))
    # With norm_eps = 0 the all-zero matrix still gives zeros, not NaN.
    assert torch.equal(CAGrad(c=0.5, norm_eps=0.0)(torch.zeros(2, 3)), torch.zeros(3))


def test_origin_as_solution_gives_zeros() -> None:
    # The hull of the rows contains the origin and c >= 1: the optimal combination is the origin.
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    assert torch.equal(
        CAGradWeighting(c=1.5)(matrix @ matrix.T), torch.zeros(4, dtype=torch.float64)
    )


def test_single_row_is_scaled_by_one_plus_c() -> None:
    row = torch.tensor([[3.0, -1.0, 2.0]], dtype=torch.float64)
    assert_close(CAGrad(c=0.5)(row), 1.5 * row[0], atol=0.0, rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    matrices(min_rows=1, max_rows=10, max_cols=8, kinds=("full", "duplicated", "non_conflicting"))
)
def test_c_zero_gives_the_mean(matrix: Tensor) -> None:
    # Unless the matrix is negligible (trace of G below norm_eps: zeros, by the spec, see
    # test_zero_tiny_and_empty_matrices); hypothesis draws matrices of any scale.
    m = matrix.shape[0]
    weights = CAGrad(c=0.0, norm_eps=0.0).weighting(matrix)
    assert_close(weights, torch.full((m,), 1.0 / m, dtype=matrix.dtype), atol=0.0, rtol=1e-15)


@settings(max_examples=30, deadline=None)
@given(
    matrices(min_rows=1, max_rows=12, max_cols=8, kinds=NONZERO_KINDS),
    st.sampled_from([1.0, 1.5, 10.0]),
)
def test_non_conflicting_when_c_at_least_one(matrix: Tensor, c: float) -> None:
    assert_non_conflicting(CAGrad(c=c), matrix, rtol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    matrices(min_rows=1, max_rows=7, max_cols=6, kinds=NONZERO_KINDS),
    st.sampled_from([0.05, 0.4, 0.8, 1.0, 3.0]),
)
def test_subproblem_is_solved_exactly(matrix: Tensor, c: float) -> None:
    problem = _Subproblem(matrix, c)
    weights = problem.solve()
    assert weights.min().item() >= 0.0
    assert abs(weights.sum().item() - 1.0) <= 1e-12
    reference, _ = problem.scipy_minimum()
    norm = (problem.rows.T @ weights).norm().item()
    # At the origin the objective is not differentiable (a norm): the solver locates it to about
    # 1e-9 of the rows' scale, not to rounding level.
    if norm <= 1e-8 * problem.rows.norm(dim=1).max().item():
        # The solver found the origin (CAGrad then returns zeros): its value 0 must be optimal.
        assert reference >= -1e-10
    else:
        assert problem.objective(weights) <= reference + 1e-10
    if norm > 1e-6:
        # First-order optimality over the simplex: an exact certificate for a convex objective.
        gradient = problem.linear + problem.radius * (problem.gramian @ weights) / norm
        assert (weights @ gradient - gradient.min()).item() <= 1e-10


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_aggregation_matches_scipy_on_full_rank_matrices(seed: int, c: float) -> None:
    matrix = sample("full", 5, 8, seed=seed)
    problem = _Subproblem(matrix, c)
    _, optimum = problem.scipy_minimum()
    norm = (problem.rows.T @ optimum).norm().item()
    expected_weights = 1.0 / 5 + (problem.radius / norm) * optimum
    assert_close(CAGrad(c=c)(matrix), expected_weights @ matrix, atol=0.0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_subproblem_matches_scipy_on_rank_deficient_matrices(seed: int) -> None:
    # Rank 2 with 6 rows: the optimal weights are not unique, the combination is.
    problem = _Subproblem(sample("low_rank", 6, 4, seed=seed), 0.6)
    value, optimum = problem.scipy_minimum()
    weights = problem.solve()
    assert problem.objective(weights) <= value + 1e-10
    assert_close(problem.rows.T @ weights, problem.rows.T @ optimum, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(matrices(min_rows=2, max_rows=10, max_cols=8, kinds=NONZERO_KINDS))
def test_permutation_invariant(matrix: Tensor) -> None:
    assert_permutation_invariant(CAGrad(c=0.5), matrix, n_permutations=2, rtol=1e-8)


@settings(max_examples=15, deadline=None)
@given(matrices(min_rows=2, max_rows=6, min_cols=6, max_cols=8, kinds=("full",)))
def test_weighting_permutation_equivariant(matrix: Tensor) -> None:
    # Full row rank: the optimal weights are unique.
    gramian = matrix @ matrix.T
    assert_weighting_permutation_equivariant(CAGradWeighting(c=0.7), gramian, rtol=1e-8)


@settings(max_examples=10, deadline=None)
@given(matrices(min_rows=1, max_rows=8, max_cols=6, kinds=NONZERO_KINDS))
def test_scale_equivariant(matrix: Tensor) -> None:
    # The weights only depend on the Gramian normalised by its trace (`norm_eps = 0` removes the
    # threshold on its trace).
    assert_scale_equivariant(
        CAGrad(c=0.5, norm_eps=0.0), matrix, factors=(1e-3, 7.0, 1e3), rtol=1e-8
    )


@pytest.mark.parametrize(
    ("dtype", "atol"),
    [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-4), (torch.float64, 1e-4)],
)
def test_dtypes(dtype: torch.dtype, atol: float) -> None:
    result = assert_output_like_input(CAGrad(c=0.5), J_BASE.to(dtype))
    assert_close(result.double(), torch.tensor([0.1835, 1.2041, 1.2041]), atol=atol, rtol=atol)
    weights = assert_weights_like_input(CAGradWeighting(c=0.5), G_BASE.to(dtype))
    assert_close(weights.double(), torch.tensor([0.7041, 0.5]), atol=atol, rtol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stays_on_cuda() -> None:
    result = assert_output_like_input(CAGrad(c=0.5), J_BASE.cuda())
    assert_close(result.cpu(), torch.tensor([0.1835, 1.2041, 1.2041]), atol=1e-4)


def test_quadratic_roots() -> None:
    assert _quadratic_roots(1.0, -3.0, 2.0) == pytest.approx([1.0, 2.0])
    assert _quadratic_roots(0.0, 2.0, -1.0) == pytest.approx([0.5])
    assert _quadratic_roots(1.0, 0.0, 1.0) == []
    # No cancellation for a tiny root next to a large one.
    small, large = _quadratic_roots(1.0, -1e8, 1.0)
    assert small == pytest.approx(1e-8, rel=1e-12)
    assert large == pytest.approx(1e8, rel=1e-12)


def _cvxpy_reference(gramian: Tensor, c: float, norm_eps: float = 1e-4) -> Tensor:
    """The original's computation (spec §3.3), with cvxpy and clarabel."""
    import cvxpy as cp

    trace = gramian.trace()
    normalized = torch.zeros_like(gramian) if trace < norm_eps else gramian / trace
    u, s, _ = torch.svd(normalized)
    a = (u @ torch.diag(s.sqrt())).numpy().astype(np.float64)
    m = a.shape[0]
    g0 = a.T @ np.ones(m) / m
    radius = c * np.linalg.norm(g0)
    w = cp.Variable(m)
    objective = cp.Minimize((a @ g0) @ w + radius * cp.norm(a.T @ w))
    cp.Problem(objective, [w >= 0, cp.sum(w) == 1]).solve(solver=cp.CLARABEL)
    optimum = w.value
    norm = np.linalg.norm(a.T @ optimum)
    if norm < norm_eps:
        return torch.zeros(m, dtype=torch.float64)
    return torch.from_numpy(np.ones(m) / m + radius / norm * optimum)


@pytest.mark.skipif(
    importlib.util.find_spec("cvxpy") is None or importlib.util.find_spec("clarabel") is None,
    reason="the original's solver stack (cvxpy, clarabel) is not installed",
)
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c", [0.3, 0.5, 1.2])
def test_matches_the_original_solver_stack(seed: int, c: float) -> None:
    matrix = sample("full", 4, 6, seed=seed, dtype=torch.float32)
    expected = _cvxpy_reference(matrix @ matrix.T, c) @ matrix.double()
    # The original's interior-point solution is accurate to about 1e-8 in the weights, which
    # moves the result by up to about 1e-4 of the entries of the matrix.
    scale = matrix.abs().max().item()
    assert_close(CAGrad(c=c)(matrix).double(), expected, atol=0.0, rtol=1e-4, scale=scale)
