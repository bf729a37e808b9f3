"""Tests of the small CPU paths of the dual-cone solver (``_dual_cone_small``): the Python-float
path (``project_tiny`` / ``solve_tiny``) and the batched torch path (``project_small`` /
``solve_small``, with its warm start from ``m = WARM_START_MIN_SIZE``).

References: the general path of the solver (the small paths disabled), a brute-force enumeration of
the free sets for ``m ≤ 6``, and the KKT conditions. A small path may decline a problem (``None``)
but never return a wrong answer.
"""

from __future__ import annotations

import pytest
import torch
from _asserts import assert_close
from _dual_cone_references import brute_force, kkt_violation, solution_scale
from _matrices import SCALES, matrices, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import torchjd.aggregation._dual_cone_small as small
from torchjd.aggregation import UPGradWeighting
from torchjd.aggregation._dual_cone import solve_dual_cone_qp
from torchjd.aggregation._utils import normalize, regularize

Problem = tuple[Tensor, Tensor, float, float]


def _general(lower: Tensor, gramian: Tensor) -> Tensor:
    """The general path's minimisers (the small paths disabled)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(small, "TINY_MAX_SIZE", 0)
        monkeypatch.setattr(small, "SMALL_MAX_SIZE", 0)
        return solve_dual_cone_qp(lower, gramian)


@st.composite
def _problems(draw: st.DrawFn, max_rows: int, min_rows: int = 1) -> Problem:
    """A raw Gramian (any scale, full rank or not, duplicated or zero rows), lower bounds (those
    of UPGrad, or random vectors of both signs), and UPGrad's ``norm_eps``, ``reg_eps``."""
    matrix = draw(matrices(min_rows=min_rows, max_rows=max_rows, max_cols=10, scales=SCALES))
    m = matrix.shape[0]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if m > 1 and draw(st.booleans()):
        matrix = matrix.clone()
        matrix[torch.randperm(m, generator=generator)[: m // 2]] = 0.0
    if draw(st.booleans()):
        lower = torch.diag(torch.rand(m, generator=generator, dtype=torch.float64) + 0.1)
    else:
        rows = draw(st.integers(1, 4))
        lower = torch.randn(rows, m, generator=generator, dtype=torch.float64)
    reg_eps = draw(st.sampled_from([1e-4, 0.0]))
    return matrix @ matrix.T, lower, 1e-4 * float(matrix.abs().max()) ** 2, reg_eps


def _check(problem: Problem, solution: Tensor | None, *, must_solve: bool) -> Tensor:
    """Check a small path's answer to ``problem`` against the general path; return the expected
    minimisers."""
    gramian, lower, norm_eps, reg_eps = problem
    regularized = regularize(normalize(gramian, norm_eps), reg_eps)
    expected = _general(lower, regularized)
    if solution is None:
        assert not must_solve, "a regularised problem was left to the general path"
        return expected
    assert solution.shape == lower.shape and solution.dtype == lower.dtype
    if reg_eps > 0.0:  # The minimiser is unique.
        assert_close(solution, expected, atol=0.0, rtol=1e-9, scale=solution_scale(expected, lower))
        assert kkt_violation(regularized, lower, solution) <= 1e-11
    else:
        assert kkt_violation(regularized, lower, solution) <= 1e-9
    return expected


@settings(max_examples=40, deadline=None)
@given(_problems(max_rows=6))
def test_paths_match_the_general_path_and_brute_force(problem: Problem) -> None:
    gramian, lower, norm_eps, reg_eps = problem
    tiny = small.project_tiny(lower.tolist(), gramian, norm_eps, reg_eps)
    fits = small.fits_tiny(lower.shape[0], gramian.shape[0])
    tiny_solution = None if tiny is None else torch.tensor(tiny, dtype=torch.float64)
    expected = _check(problem, tiny_solution, must_solve=fits and reg_eps > 0.0)
    _check(problem, small.project_small(lower, gramian, norm_eps, reg_eps), must_solve=reg_eps > 0)
    if reg_eps > 0.0:
        regularized = regularize(normalize(gramian, norm_eps), reg_eps)
        reference = torch.stack([brute_force(regularized, u) for u in lower])
        assert_close(
            expected, reference, atol=0.0, rtol=1e-9, scale=solution_scale(expected, lower)
        )


@settings(max_examples=30, deadline=None)
@given(_problems(max_rows=32, min_rows=7))
def test_batched_path_matches_the_general_path(problem: Problem) -> None:
    # From m = WARM_START_MIN_SIZE, with the warm start.
    gramian, lower, norm_eps, reg_eps = problem
    _check(problem, small.project_small(lower, gramian, norm_eps, reg_eps), must_solve=False)


@settings(max_examples=20, deadline=None)
@given(_problems(max_rows=12))
def test_warm_start_at_any_size(problem: Problem) -> None:
    gramian, lower, norm_eps, reg_eps = problem
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(small, "WARM_START_MIN_SIZE", 1)
        solution = small.project_small(lower, gramian, norm_eps, reg_eps)
    _check(problem, solution, must_solve=False)


@pytest.mark.parametrize("norm_eps", [1e-4, 1e6])
def test_small_paths_solve_the_usual_problems(norm_eps: float) -> None:
    # Not a timing test: the usual UPGrad problems stay on the small paths (None would mean the
    # slow general path), up to m = 32, full rank or not, with and without the warm start. With
    # norm_eps = 1e6, the trace is below it and G' = reg_eps I.
    for m in [2, 3, 4, 5, 6, 8, 12, 16, 20, 24, 32]:
        for kind in ["full", "low_rank"]:
            matrix = sample(kind, m, 2 * m, seed=m)  # type: ignore[arg-type]
            gramian = matrix @ matrix.T
            lower = torch.diag(torch.full((m,), 1.0 / m, dtype=torch.float64))
            problem = (gramian, lower, norm_eps, 1e-4)
            _check(problem, small.project_small(lower, gramian, norm_eps, 1e-4), must_solve=True)
            if small.fits_tiny(m, m):
                tiny = small.project_tiny(lower.tolist(), gramian, norm_eps, 1e-4)
                assert tiny is not None
                _check(problem, torch.tensor(tiny, dtype=torch.float64), must_solve=True)


@pytest.mark.parametrize("m", [1, 3, 7, 21])
def test_solvers_without_normalisation(m: int) -> None:
    # solve_tiny and solve_small on a raw Gramian (as the general solver calls them), far from
    # trace 1: the minimiser does not depend on the scale.
    matrix = sample("full", m, m + 3, scale=1e5, seed=m)  # type: ignore[arg-type]
    gramian = matrix @ matrix.T
    lower = torch.randn(3, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    expected = _general(lower, gramian)
    offsets = small.solve_small(lower, gramian)
    assert offsets is not None
    assert_close(
        lower + offsets, expected, atol=0.0, rtol=1e-9, scale=solution_scale(expected, lower)
    )
    tiny = small.solve_tiny(lower.tolist(), gramian.tolist())
    if m <= small.TINY_MAX_SIZE:
        assert tiny is not None
        solution = torch.tensor(tiny, dtype=torch.float64)
        assert_close(solution, expected, atol=0.0, rtol=1e-9, scale=solution_scale(expected, lower))
    else:
        assert tiny is None
    through_dispatch = solve_dual_cone_qp(lower, gramian)
    assert_close(
        through_dispatch, expected, atol=0.0, rtol=1e-9, scale=solution_scale(expected, lower)
    )


def _hard_inputs() -> list[tuple[str, Tensor, Tensor]]:
    lower = torch.eye(3, dtype=torch.float64)
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.1], dtype=torch.float64))
    nan_entry = torch.eye(3, dtype=torch.float64)
    nan_entry[0, 1] = nan_entry[1, 0] = float("nan")
    inf_entry = torch.eye(3, dtype=torch.float64)
    inf_entry[2, 0] = float("inf")
    inf_lower = lower.clone()
    inf_lower[1, 2] = float("inf")
    nan_lower = lower.clone()
    nan_lower[0, 0] = float("nan")
    zero = torch.zeros(3, 3, dtype=torch.float64)
    gramian = torch.eye(3, dtype=torch.float64) + 0.5
    return [
        ("indefinite", indefinite, lower),
        ("nan in G", nan_entry, lower),
        ("inf in G", inf_entry, lower),
        ("inf in u", gramian, inf_lower),
        ("nan in u", gramian, nan_lower),
        ("zero trace", zero, lower),
    ]


@pytest.mark.parametrize(("name", "gramian", "lower"), _hard_inputs())
def test_hard_inputs_are_left_to_the_general_path(
    name: str, gramian: Tensor, lower: Tensor
) -> None:
    assert small.solve_small(lower, gramian) is None, name
    assert small.solve_tiny(lower.tolist(), gramian.tolist()) is None, name
    # With norm_eps = 0, a zero trace is not "small": G / 0 is left to the general path; with
    # reg_eps = 0 the indefinite G stays indefinite.
    assert small.project_small(lower, gramian, 0.0, 0.0) is None, name
    assert small.project_tiny(lower.tolist(), gramian, 0.0, 0.0) is None, name


def test_indefinite_regularised_enough_is_solved() -> None:
    # G / trace + reg_eps I is positive definite if reg_eps exceeds the negative eigenvalue.
    gramian = torch.diag(torch.tensor([1.0, 1.0, -0.05], dtype=torch.float64))
    lower = torch.eye(3, dtype=torch.float64)
    problem = (gramian, lower, 1e-4, 0.1)
    _check(problem, small.project_small(lower, gramian, 1e-4, 0.1), must_solve=True)
    tiny = small.project_tiny(lower.tolist(), gramian, 1e-4, 0.1)
    assert tiny is not None
    _check(problem, torch.tensor(tiny, dtype=torch.float64), must_solve=True)


def test_unconverged_and_oversized_problems_are_declined(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = sample("full", 10, 12, seed=0)  # type: ignore[arg-type]
    gramian = matrix @ matrix.T
    lower = torch.diag(torch.full((10,), 0.1, dtype=torch.float64))
    assert small.project_small(lower, gramian, 1e-4, 1e-4) is not None
    big = torch.eye(small.SMALL_MAX_SIZE + 1, dtype=torch.float64)
    assert small.project_small(big, big, 1e-4, 1e-4) is None
    # Too much work for the Python path: too many rows, or too large.
    eye = torch.eye(4, dtype=torch.float64)
    assert small.project_tiny([[1.0, 0.0, 0.0, 0.0]] * 17, eye, 1e-4, 1e-4) is None
    assert small.project_tiny(lower.tolist(), gramian, 1e-4, 1e-4) is None
    assert small.solve_tiny(lower.tolist(), gramian.tolist()) is None
    monkeypatch.setattr(small, "_SMALL_MAX_ROUNDS", 1)
    assert small.project_small(lower, gramian, 1e-4, 1e-4) is None
    tiny_lower = torch.diag(torch.full((4,), 0.25, dtype=torch.float64))
    tiny_gramian = sample("full", 4, 8, seed=4)  # type: ignore[arg-type]
    tiny_gramian = tiny_gramian @ tiny_gramian.T
    assert small.project_tiny(tiny_lower.tolist(), tiny_gramian, 1e-4, 1e-4) is None


def test_float32_and_no_gradient() -> None:
    matrix = sample("full", 9, 11, seed=1)  # type: ignore[arg-type]
    gramian64 = matrix @ matrix.T
    gramian = gramian64.float().requires_grad_()
    lower = (torch.eye(9) / 9).requires_grad_()
    solution = small.project_small(lower, gramian, 1e-4, 1e-4)
    assert solution is not None
    assert solution.dtype == torch.float32 and not solution.requires_grad
    assert (solution >= lower).all()
    expected = small.project_small(lower.detach().double(), gramian64, 1e-4, 1e-4)
    assert expected is not None
    assert_close(solution, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("m", [2, 5, 8, 13, 24])
def test_upgrad_weights_are_those_of_the_general_path(m: int) -> None:
    matrix = sample("low_rank", m, 3 * m, seed=m)  # type: ignore[arg-type]
    gramian = matrix @ matrix.T
    weights = UPGradWeighting()(gramian)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(small, "TINY_MAX_SIZE", 0)
        monkeypatch.setattr(small, "SMALL_MAX_SIZE", 0)
        expected = UPGradWeighting()(gramian)
    assert_close(weights, expected, atol=0.0, rtol=1e-9)


def test_cycling_rows_finish_by_the_least_index_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ill-conditioned (low-rank, lightly regularised) problems on which the block exchanges cycle:
    # without the least-index rounds, the small paths give up; with them, they solve exactly.
    cases = []
    for m, seed in [(6, 1), (16, 13)]:
        matrix = sample("low_rank", m, 10, seed=seed)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(seed)
        if m == 6:
            lower = torch.randn(4, m, generator=generator, dtype=torch.float64)
        else:
            lower = torch.diag(torch.full((m,), 1.0 / m, dtype=torch.float64))
        cases.append((matrix @ matrix.T, lower, 1e-4, 1e-4))

    def solve(problem: Problem) -> Tensor | None:
        gramian, lower, norm_eps, reg_eps = problem
        if small.fits_tiny(lower.shape[0], gramian.shape[0]):
            tiny = small.project_tiny(lower.tolist(), gramian, norm_eps, reg_eps)
            return None if tiny is None else torch.tensor(tiny, dtype=torch.float64)
        return small.project_small(lower, gramian, norm_eps, reg_eps)

    for problem in cases:
        _check(problem, solve(problem), must_solve=True)
    monkeypatch.setattr(small, "_LEAST_INDEX_ROUNDS_PER_SIZE", 0)
    for problem in cases:
        assert solve(problem) is None
