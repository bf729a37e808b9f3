from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch
from _asserts import (
    assert_close,
    assert_non_differentiable,
    assert_output_like_input,
    assert_zero_for_zero_matrix,
)
from _matrices import J_BASE, matrices, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize, nnls
from torch import Tensor

from torchjd.aggregation import NashMTL
from torchjd.aggregation._nash_mtl import _NashMTLWeighting
from torchjd.aggregation._nash_mtl_solver import (
    _bargaining_point_if_optimal,
    _barrier_method,
    _strictly_feasible_point,
    solve_nash_mtl_subproblem,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _weighting(aggregator: NashMTL) -> _NashMTLWeighting:
    weighting = aggregator.weighting
    assert isinstance(weighting, _NashMTLWeighting)
    return weighting


class _Subproblem:
    """One subproblem of the iterations: ``min kᵀα`` s.t. ``α_i (Ĝα)_i ≥ ε``, from ``α_p``."""

    def __init__(self, matrix: Tensor, previous: Tensor) -> None:
        gramian = matrix @ matrix.T
        factor = torch.linalg.matrix_norm(gramian).item()
        self.gramian = gramian / factor
        self.epsilon = 1.0 / factor
        self.previous = previous
        inverse_products = 1.0 / (self.gramian @ previous)
        self.cost = self.gramian.sum(dim=1) + self.epsilon * (
            1.0 / previous + self.gramian @ inverse_products
        )

    def slacks(self, alpha: Tensor) -> Tensor:
        """``α_i (Ĝα)_i / ε - 1``: non-negative on the feasible set."""
        return alpha * (self.gramian @ alpha) / self.epsilon - 1.0

    def solve(self) -> Tensor | None:
        return solve_nash_mtl_subproblem(self.gramian, self.epsilon, self.previous)

    def assert_kkt(self, alpha: Tensor) -> None:
        """Feasible, and ``k`` is a non-negative combination of the gradients of the active
        constraints (an exact optimality certificate, the problem being convex)."""
        slacks = self.slacks(alpha)
        assert slacks.min().item() >= -1e-9, f"infeasible: {slacks}"
        active = slacks <= 1e-6
        # scipy's nnls aborts the process on a matrix without columns.
        assert active.any(), f"no active constraint, but the cost is not zero: {slacks}"
        products = self.gramian @ alpha
        gradients = torch.diag(products) + alpha.unsqueeze(1) * self.gramian
        multipliers, residual = nnls(gradients[active].T.numpy(), self.cost.numpy())
        # Relative to the size of the terms that cancel out in the stationarity condition.
        terms = torch.from_numpy(multipliers) @ gradients[active].norm(dim=1)
        scale = self.cost.norm().item() + terms.item()
        assert residual <= 1e-8 * scale, f"KKT residual {residual} (scale {scale})"

    def scipy_minimum(self, start: Tensor) -> float:
        def constraint(a: np.ndarray) -> np.ndarray:
            return a * (self.gramian.numpy() @ a) / self.epsilon - 1.0

        result = minimize(
            lambda a: float(self.cost.numpy() @ a),
            start.numpy(),
            jac=lambda a: self.cost.numpy(),
            method="SLSQP",
            bounds=[(0.0, None)] * len(start),
            constraints=[{"type": "ineq", "fun": constraint}],
            options={"ftol": 1e-14, "maxiter": 1000},
        )
        assert constraint(result.x).min() >= -1e-7
        return float(result.fun)


def test_reference_value() -> None:
    assert_close(NashMTL(n_tasks=2)(J_BASE), torch.tensor([0.0542, 0.7061, 0.7061]), atol=1e-4)


def test_repr_and_str() -> None:
    aggregator = NashMTL(n_tasks=2, max_norm=1.5, update_weights_every=2, optim_niter=5)
    assert repr(aggregator) == (
        "NashMTL(n_tasks=2, max_norm=1.5, update_weights_every=2, optim_niter=5)"
    )
    assert str(aggregator) == "NashMTL"
    assert repr(NashMTL(3)) == (
        "NashMTL(n_tasks=3, max_norm=1.0, update_weights_every=1, optim_niter=20)"
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_tasks": 0}, "n_tasks"),
        ({"n_tasks": 2.0}, "n_tasks"),
        ({"n_tasks": True}, "n_tasks"),
        ({"n_tasks": 2, "max_norm": float("nan")}, "max_norm"),
        ({"n_tasks": 2, "max_norm": "1"}, "max_norm"),
        ({"n_tasks": 2, "update_weights_every": 0}, "update_weights_every"),
        ({"n_tasks": 2, "update_weights_every": 1.5}, "update_weights_every"),
        ({"n_tasks": 2, "optim_niter": -1}, "optim_niter"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=f"Parameter `{name}` should be"):
        NashMTL(**kwargs)  # type: ignore[arg-type]


def test_wrong_number_of_rows_is_rejected() -> None:
    with pytest.raises(ValueError) as info:
        NashMTL(n_tasks=3)(J_BASE)
    assert "`n_tasks = 3`" in str(info.value)
    assert "torch.Size([2, 3])" in str(info.value)
    with pytest.raises(ValueError, match="dimension 2"):
        NashMTL(n_tasks=2)(torch.ones(2))


def test_non_differentiable() -> None:
    assert_non_differentiable(NashMTL(n_tasks=2), J_BASE)


def test_zero_matrix_gives_zeros_and_keeps_the_state() -> None:
    aggregator = NashMTL(n_tasks=3)
    assert_zero_for_zero_matrix(aggregator, 3, 4)
    assert torch.equal(_weighting(aggregator).prvs_alpha, torch.ones(3, dtype=torch.float64))


def test_infeasible_problem_keeps_the_weights() -> None:
    # The origin is in the hull of the gradients: no positive weights satisfy the condition.
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    aggregator = NashMTL(n_tasks=3, max_norm=0.0)
    assert torch.equal(aggregator(matrix), torch.ones(3, dtype=torch.float64) @ matrix)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = assert_output_like_input(NashMTL(n_tasks=2), J_BASE.to(dtype))
    expected = torch.tensor([0.0542, 0.7061, 0.7061])
    assert_close(result.float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stays_on_cuda() -> None:
    result = assert_output_like_input(NashMTL(n_tasks=2), J_BASE.cuda())
    assert_close(result.cpu(), torch.tensor([0.0542, 0.7061, 0.7061]), atol=1e-4)


@settings(max_examples=15, deadline=None)
@given(matrices(min_rows=2, max_rows=6, min_cols=6, max_cols=10, kinds=("non_conflicting",)))
def test_weights_are_the_bargaining_solution(matrix: Tensor) -> None:
    # Without conflict, the iterations start from a feasible point and reach the Nash bargaining
    # solution α ⊙ (G α) = 1 (G the Gramian, not normalised), without rescaling (max_norm = 0).
    n = matrix.shape[0]
    weights = _weighting(NashMTL(n_tasks=n, max_norm=0.0))(matrix)
    assert (weights > 0).all()
    products = weights * (matrix @ matrix.T @ weights)
    assert_close(products, torch.ones(n, dtype=matrix.dtype), atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(
    matrices(min_rows=2, max_rows=5, min_cols=1, max_cols=8),
    st.sampled_from([0.0, 0.5, 1.0, 20.0]),
)
def test_max_norm_bounds_the_result(matrix: Tensor, max_norm: float) -> None:
    n = matrix.shape[0]
    aggregator = NashMTL(n_tasks=n, max_norm=max_norm)
    result = aggregator(matrix)
    unscaled = _weighting(aggregator).prvs_alpha @ matrix
    if max_norm == 0.0 or unscaled.norm() <= max_norm:
        assert_close(result, unscaled, atol=0.0, rtol=1e-12)
    else:
        assert result.norm().item() == pytest.approx(max_norm, rel=1e-12)
        assert_close(result, unscaled * (max_norm / unscaled.norm()), atol=0.0, rtol=1e-12)


def _sequence(n: int, length: int, seed: int) -> list[Tensor]:
    base = sample("full", n, 7, seed=seed)
    return [base + 0.3 * sample("full", n, 7, seed=seed + 1 + step) for step in range(length)]


def test_reset_restores_the_initial_state() -> None:
    matrices_ = _sequence(3, 4, seed=10)
    aggregator = NashMTL(n_tasks=3, optim_niter=2)
    first = [aggregator(matrix) for matrix in matrices_]
    weighting = _weighting(aggregator)
    assert weighting.step == 4
    aggregator.reset()
    assert weighting.step == 0
    assert torch.equal(weighting.prvs_alpha, torch.ones(3, dtype=torch.float64))
    assert weighting.normalization_factor == 1.0
    second = [aggregator(matrix) for matrix in matrices_]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_results_depend_on_previous_matrices() -> None:
    # One subproblem per call: the weights move from the previous ones, so the history matters.
    matrices_ = _sequence(3, 3, seed=1)
    fresh = NashMTL(n_tasks=3, optim_niter=1)(matrices_[2])
    used = NashMTL(n_tasks=3, optim_niter=1)
    for matrix in matrices_:
        result = used(matrix)
    assert not torch.allclose(result, fresh)


def test_update_weights_every_reuses_the_weights() -> None:
    matrices_ = _sequence(3, 5, seed=30)
    aggregator = NashMTL(n_tasks=3, max_norm=0.0, update_weights_every=2)
    weighting = _weighting(aggregator)
    weights = []
    for matrix in matrices_:
        weights.append(weighting.prvs_alpha.clone())
        aggregator(matrix)
    weights.append(weighting.prvs_alpha.clone())
    # Updates happen on calls 1, 3, 5 (steps 0, 2, 4); calls 2 and 4 reuse the weights.
    assert not torch.equal(weights[1], weights[0])
    assert torch.equal(weights[2], weights[1])
    assert not torch.equal(weights[3], weights[2])
    assert torch.equal(weights[4], weights[3])
    assert not torch.equal(weights[5], weights[4])
    assert weighting.step == 5
    # A reused step combines the new matrix with the stored weights.
    aggregator.reset()
    aggregator(matrices_[0])
    stored = weighting.prvs_alpha.clone()
    assert torch.equal(aggregator(matrices_[1]), stored @ matrices_[1])


def test_zero_iterations_keep_the_initial_weights() -> None:
    matrix = sample("full", 3, 5, seed=1)
    assert torch.equal(
        NashMTL(n_tasks=3, max_norm=0.0, optim_niter=0)(matrix),
        torch.ones(3, dtype=matrix.dtype) @ matrix,
    )


@settings(max_examples=25, deadline=None)
@given(
    matrices(min_rows=2, max_rows=6, min_cols=1, max_cols=8, kinds=("full", "low_rank")),
    st.integers(0, 10_000),
)
def test_subproblem_solution_satisfies_kkt(matrix: Tensor, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    previous = torch.rand(matrix.shape[0], generator=generator, dtype=matrix.dtype) * 2 + 0.1
    problem = _Subproblem(matrix, previous)
    solution = problem.solve()
    if solution is None:
        return  # Infeasible or unbounded: checked by the tests below.
    problem.assert_kkt(solution)


@pytest.mark.parametrize("seed", [1, 7, 13, 16, 18])
def test_barrier_method_when_not_all_constraints_are_active(seed: int) -> None:
    matrix = sample("full", 4, 6, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    previous = torch.rand(4, generator=generator, dtype=torch.float64) + 0.2
    problem = _Subproblem(matrix, previous)
    scaled_previous = previous / math.sqrt(problem.epsilon)
    start = _strictly_feasible_point(problem.gramian, scaled_previous)
    assert start is not None
    # The bargaining point (all constraints active) is not optimal here: the barrier method runs.
    assert _bargaining_point_if_optimal(problem.gramian, problem.cost, start) is None
    solution = problem.solve()
    assert solution is not None
    problem.assert_kkt(solution)
    assert (problem.slacks(solution) > 1e-3).any()
    value = (problem.cost @ solution).item()
    # SLSQP's minimiser may violate the constraints by up to 1e-7, and so undercut ours by as much.
    assert value <= problem.scipy_minimum(solution * 1.5) + 1e-7 * abs(value)


@pytest.mark.parametrize("seed", range(4))
def test_barrier_method_agrees_with_the_bargaining_point(seed: int) -> None:
    matrix = sample("non_conflicting", 3, 5, seed=seed)
    problem = _Subproblem(matrix, torch.ones(3, dtype=torch.float64))
    start = _strictly_feasible_point(problem.gramian, torch.ones(3, dtype=torch.float64))
    assert start is not None
    corner = _bargaining_point_if_optimal(problem.gramian, problem.cost, start)
    barrier = _barrier_method(problem.gramian, problem.cost, start)
    assert corner is not None and barrier is not None
    assert_close(barrier, corner, atol=0.0, rtol=1e-9)


def test_infeasible_subproblem_has_no_solution() -> None:
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.5, -1.0]], dtype=torch.float64)
    assert _Subproblem(matrix, torch.ones(3, dtype=torch.float64)).solve() is None


def test_unbounded_subproblem_has_no_solution() -> None:
    # From this previous iterate, (Ĝα_p)_0 < 0 and the linearised cost has a descent direction
    # that stays feasible (the original solver reports "unbounded").
    matrix = torch.tensor([[-1.2535, -0.0592], [1.1878, 1.2247]], dtype=torch.float64)
    problem = _Subproblem(matrix, torch.tensor([1.9641, 1.9871], dtype=torch.float64))
    assert problem.solve() is None
    # Certificate: a feasible point with negative cost (any multiple above 1 stays feasible).
    found = False
    for theta in torch.linspace(0.01, 0.99, 99, dtype=torch.float64).tolist():
        direction = torch.tensor([theta, 1.0 - theta], dtype=torch.float64)
        products = direction * (problem.gramian @ direction)
        if (products > 0).all():
            point = direction * math.sqrt(2 * problem.epsilon / products.min().item())
            found = found or (problem.cost @ point).item() < 0
    assert found


def _cvxpy_reference(n_tasks: int, matrices_: list[Tensor], **kwargs: float) -> list[Tensor]:
    """The original NashMTL (spec §3.3), with cvxpy and ECOS, on a sequence of matrices."""
    import cvxpy as cp

    max_norm = kwargs.get("max_norm", 1.0)
    every = int(kwargs.get("update_weights_every", 1))
    optim_niter = int(kwargs.get("optim_niter", 20))
    alpha = cp.Variable(shape=(n_tasks,), nonneg=True)
    previous = cp.Parameter(shape=(n_tasks,), value=np.ones(n_tasks))
    gramian = cp.Parameter(shape=(n_tasks, n_tasks), value=np.eye(n_tasks))
    factor = cp.Parameter(shape=(1,), value=np.ones(1))
    gradient = 1 / previous + (1 / (gramian @ previous)) @ gramian
    products = gramian @ alpha
    constraints = [-cp.log(alpha[i] * factor) - cp.log(products[i]) <= 0 for i in range(n_tasks)]
    objective = cp.Minimize(cp.sum(products) + gradient @ (alpha - previous) / factor)
    problem = cp.Problem(objective, constraints)

    weights, results = np.ones(n_tasks), []
    for step, matrix in enumerate(matrices_):
        if step % every == 0:
            gtg = (matrix @ matrix.T).numpy()
            factor.value = np.array([np.linalg.norm(gtg)])
            gtg = gtg / factor.value[0]
            gramian.value = gtg
            current = weights
            for _ in range(optim_niter):
                alpha.value = current
                previous.value = current
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        problem.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
                except cp.SolverError:
                    alpha.value = previous.value
                if (
                    alpha.value is None
                    or np.linalg.norm(gtg @ current - 1 / (current + 1e-10)) < 1e-3
                    or np.linalg.norm(alpha.value - previous.value) < 1e-6
                ):
                    break
                current = alpha.value
            weights = current
        result = torch.from_numpy(weights) @ matrix
        if 0 < max_norm < result.norm():
            result = result * (max_norm / result.norm())
        results.append(result)
    return results


@pytest.mark.skipif(
    importlib.util.find_spec("cvxpy") is None or importlib.util.find_spec("ecos") is None,
    reason="the original's solver stack (cvxpy, ecos) is not installed",
)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"max_norm": 0.0}, {"update_weights_every": 2, "optim_niter": 3, "max_norm": 2.5}],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_original_solver_stack(kwargs: dict[str, float], seed: int) -> None:
    matrices_ = _sequence(3, 4, seed=seed)
    expected = _cvxpy_reference(3, matrices_, **kwargs)
    aggregator = NashMTL(n_tasks=3, **kwargs)  # type: ignore[arg-type]
    for matrix, reference in zip(matrices_, expected):
        assert_close(aggregator(matrix), reference, atol=0.0, rtol=1e-5)


def test_barrier_solution_is_polished_onto_its_active_constraints() -> None:
    # Found by hypothesis: a rank-3 Gramian where the barrier method, at its duality gap, leaves a
    # slack of 1.4e-6 on a constraint with a tiny multiplier; without the polish that constraint
    # looks inactive and the optimality certificate fails.
    matrix = torch.tensor(
        [
            [0.6391, 1.7345, -1.6540, 0.1668, 0.0542, 0.5567],
            [-0.4482, -0.7055, 2.1408, 0.3995, -1.5088, 0.5891],
            [-0.5059, -0.8252, 1.4837, 0.0219, -0.0762, -0.7774],
            [-0.1287, 0.0595, -0.0725, -0.1629, 0.9069, -1.2103],
            [-0.4320, -2.0016, 1.9412, 0.1497, -1.8989, 1.8517],
            [-0.4882, -0.9639, 1.0038, -0.1968, 0.5964, -1.2401],
        ],
        dtype=torch.float64,
    )
    generator = torch.Generator().manual_seed(1)
    previous = torch.rand(6, generator=generator, dtype=torch.float64) * 2 + 0.1
    problem = _Subproblem(matrix, previous)
    solution = problem.solve()
    assert solution is not None
    slacks = problem.slacks(solution)
    assert (slacks.abs() <= 1e-9).sum() == 5  # all but one constraint active, to rounding
    problem.assert_kkt(solution)
