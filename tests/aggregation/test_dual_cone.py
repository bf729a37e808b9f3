"""Tests of the dual-cone solver: ``min vᵀ G v  s.t.  v ≥ u`` for many ``u`` at once.

References: the KKT conditions, a brute-force enumeration of the free sets for small ``m`` (which
needs nothing but torch), and quadprog when it is installed (parity tests only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _asserts import assert_close
from _dual_cone_references import brute_force, kkt_violation, solution_scale
from _matrices import SCALES, matrices, sample, sample_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import torchjd.aggregation._dual_cone as dual_cone
import torchjd.aggregation._dual_cone_small as dual_cone_small
from torchjd.aggregation._dual_cone import (
    SOLVERS,
    _Problem,
    _solve_masked,
    check_epsilon,
    check_solver,
    project_weights,
    solve_dual_cone_qp,
)
from torchjd.aggregation._utils import normalize, regularize

_EPS64 = torch.finfo(torch.float64).eps


def _normalized(matrix: Tensor, reg_eps: float = 1e-4) -> Tensor:
    """The Gramian of ``matrix`` divided by its trace, plus ``reg_eps`` times the identity."""
    gramian = matrix @ matrix.T
    trace = gramian.trace()
    if trace > 0:
        gramian = gramian / trace
    return gramian + reg_eps * torch.eye(gramian.shape[0], dtype=gramian.dtype)


def _quadprog_solution(gramian: Tensor, lower: Tensor) -> Tensor:
    quadprog = pytest.importorskip("quadprog")
    import numpy as np

    m = gramian.shape[0]
    matrix = gramian.to(torch.float64).numpy()
    rows = [
        quadprog.solve_qp(matrix, np.zeros(m), np.eye(m), u, 0)[0]
        for u in lower.to(torch.float64).reshape(-1, m).numpy()
    ]
    return torch.tensor(np.array(rows)).reshape(lower.shape)


def _upgrad_lower(m: int, generator: torch.Generator) -> Tensor:
    return torch.diag(torch.rand(m, generator=generator, dtype=torch.float64) + 0.1)


@st.composite
def _problems(draw: st.DrawFn, max_rows: int = 12, reg_eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """A regularised, trace-normalised Gramian of a sampled matrix and a batch of lower bounds:
    either ``diag(u)`` (the problems of UPGrad) or random vectors of both signs."""
    matrix = draw(matrices(max_rows=max_rows, max_cols=12, scales=SCALES))
    m = matrix.shape[0]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        lower = _upgrad_lower(m, generator)
    else:
        lower = torch.randn(draw(st.integers(1, 4)), m, generator=generator, dtype=torch.float64)
    return _normalized(matrix, reg_eps), lower


@settings(max_examples=40, deadline=None)
@given(_problems(max_rows=7))
def test_matches_brute_force(problem: tuple[Tensor, Tensor]) -> None:
    gramian, lower = problem
    solution = solve_dual_cone_qp(lower, gramian)
    expected = torch.stack([brute_force(gramian, u) for u in lower])
    assert_close(solution, expected, atol=0.0, rtol=1e-9, scale=solution_scale(expected, lower))


@settings(max_examples=40, deadline=None)
@given(_problems(max_rows=40))
def test_kkt_conditions_hold(problem: tuple[Tensor, Tensor]) -> None:
    gramian, lower = problem
    solution = solve_dual_cone_qp(lower, gramian)
    assert kkt_violation(gramian, lower, solution) <= 1e-11


@settings(max_examples=25, deadline=None)
@given(_problems(max_rows=40, reg_eps=0.0))
def test_kkt_conditions_hold_for_singular_gramians(problem: tuple[Tensor, Tensor]) -> None:
    # Without regularisation, rank-deficient Gramians (m > n, low rank, duplicated rows) still get
    # a minimiser; the minimiser is not unique there, the KKT conditions say it is one.
    gramian, lower = problem
    solution = solve_dual_cone_qp(lower, gramian)
    assert kkt_violation(gramian, lower, solution) <= 1e-9


@pytest.mark.parametrize("kind", ["full", "low_rank", "duplicated", "rank_one"])
@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_matches_quadprog(kind: str, scale: float) -> None:
    pytest.importorskip("quadprog")
    for seed, (m, n) in enumerate([(5, 9), (24, 40), (64, 32)]):
        gramian = _normalized(sample(kind, m, n, scale=scale, seed=seed))  # type: ignore[arg-type]
        lower = _upgrad_lower(m, torch.Generator().manual_seed(seed))
        expected = _quadprog_solution(gramian, lower)
        assert_close(solve_dual_cone_qp(lower, gramian), expected, atol=0.0, rtol=1e-9)


def test_matches_quadprog_in_float32() -> None:
    pytest.importorskip("quadprog")
    matrix = sample_matrix(32, 20, rank=10, seed=5)
    gramian64 = _normalized(matrix)
    lower64 = _upgrad_lower(32, torch.Generator().manual_seed(1))
    solution = solve_dual_cone_qp(lower64.float(), gramian64.float())
    assert solution.dtype == torch.float32
    assert_close(solution, _quadprog_solution(gramian64, lower64), atol=0.0, rtol=1e-5)


def test_project_weights_dispatches_to_quadprog() -> None:
    pytest.importorskip("quadprog")
    gramian = _normalized(sample_matrix(6, 4, seed=2))
    lower = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = _quadprog_solution(gramian, lower)
    scale = solution_scale(expected, lower)
    assert_close(project_weights(lower, gramian, "quadprog"), expected, atol=0.0, rtol=1e-12)
    assert_close(
        project_weights(lower, gramian, "active_set"), expected, atol=0.0, rtol=1e-9, scale=scale
    )


def test_quadprog_rejects_singular_gramians() -> None:
    pytest.importorskip("quadprog")
    gramian = _normalized(sample_matrix(4, 2, seed=0), reg_eps=0.0)
    with pytest.raises(ValueError, match="reg_eps > 0"):
        project_weights(torch.eye(4, dtype=torch.float64), gramian, "quadprog")


def test_invariant_to_the_scale_of_the_gramian() -> None:
    gramian = _normalized(sample_matrix(30, 50, seed=3))
    lower = _upgrad_lower(30, torch.Generator().manual_seed(0))
    expected = solve_dual_cone_qp(lower, gramian)
    for factor in (1e-250, 1e-12, 1e12, 1e250):
        assert_close(solve_dual_cone_qp(lower, factor * gramian), expected, atol=0.0, rtol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 5, 60])
def test_masked_path_agrees_with_gathered_path(m: int) -> None:
    # The masked path is the one used on accelerators; it runs on the CPU too.
    for seed, kind in enumerate(["full", "low_rank", "non_conflicting", "duplicated"]):
        gramian = _normalized(sample(kind, m, 8, seed=seed))  # type: ignore[arg-type]
        lower = torch.cat(
            [
                _upgrad_lower(m, torch.Generator().manual_seed(seed)),
                torch.randn(3, m, dtype=torch.float64, generator=torch.Generator().manual_seed(9)),
            ]
        )
        masked = lower + _solve_masked(_Problem(gramian, lower))
        assert_close(masked, solve_dual_cone_qp(lower, gramian), atol=0.0, rtol=1e-10)
        assert kkt_violation(gramian, lower, masked) <= 1e-11


def test_masked_path_on_a_singular_gramian() -> None:
    gramian = _normalized(sample("duplicated", 12, 5, seed=4), reg_eps=0.0)
    lower = _upgrad_lower(12, torch.Generator().manual_seed(2))
    masked = lower + _solve_masked(_Problem(gramian, lower))
    assert kkt_violation(gramian, lower, masked) <= 1e-9


def test_cold_start_and_small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the warm start, the pivoting does all the work (many rounds, the single-index rule
    # included), and tiny chunks split every round into many batches of systems.
    gramian = _normalized(sample_matrix(40, 20, rank=10, seed=7))
    lower = _upgrad_lower(40, torch.Generator().manual_seed(3))
    expected = solve_dual_cone_qp(lower, gramian)
    monkeypatch.setattr(dual_cone, "_WARM_START_ITERATIONS", 0)
    monkeypatch.setattr(dual_cone, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(dual_cone, "_PATIENCE", 0)
    solution = solve_dual_cone_qp(lower, gramian)
    assert_close(solution, expected, atol=0.0, rtol=1e-10)
    assert kkt_violation(gramian, lower, solution) <= 1e-11


def test_zero_gramian_keeps_the_lower_bounds() -> None:
    lower = torch.tensor([[0.5, -1.0, 0.0], [2.0, 3.0, -4.0]], dtype=torch.float64)
    assert torch.equal(solve_dual_cone_qp(lower, torch.zeros(3, 3, dtype=torch.float64)), lower)


def test_scaled_identity_gives_the_positive_part() -> None:
    lower = torch.tensor([[0.5, -1.0, 0.0], [2.0, 3.0, -4.0]], dtype=torch.float64)
    gramian = 1e-4 * torch.eye(3, dtype=torch.float64)
    assert_close(solve_dual_cone_qp(lower, gramian), lower.clamp_min(0.0), atol=1e-15)


def test_non_conflicting_rows_keep_their_weights() -> None:
    matrix = sample("non_conflicting", 10, 6, seed=0)
    lower = _upgrad_lower(10, torch.Generator().manual_seed(0))
    assert torch.equal(solve_dual_cone_qp(lower, _normalized(matrix)), lower)


def test_shapes_dtypes_and_empty_inputs() -> None:
    gramian = _normalized(sample_matrix(4, 3, seed=1))
    lower = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solution = solve_dual_cone_qp(lower, gramian)
    assert solution.shape == (2, 3, 4)
    assert_close(solution[1, 2], solve_dual_cone_qp(lower[1, 2], gramian), atol=1e-12)
    single = solve_dual_cone_qp(lower.float(), gramian.float())
    assert single.dtype == torch.float32
    assert (single >= lower.float()).all()
    assert solve_dual_cone_qp(torch.zeros(0, 4), gramian.float()).shape == (0, 4)
    assert solve_dual_cone_qp(torch.zeros(3, 0), torch.zeros(0, 0)).shape == (3, 0)


def test_result_carries_no_gradient() -> None:
    gramian = _normalized(sample_matrix(3, 3, seed=0)).requires_grad_(True)
    lower = torch.eye(3, dtype=torch.float64, requires_grad=True)
    assert not solve_dual_cone_qp(lower, gramian).requires_grad


def test_bad_inputs_are_rejected() -> None:
    gramian = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="square"):
        solve_dual_cone_qp(torch.ones(3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="last dimension"):
        solve_dual_cone_qp(torch.ones(2), gramian)
    with pytest.raises(ValueError, match="finite"):
        solve_dual_cone_qp(torch.ones(3), gramian * float("nan"))
    with pytest.raises(ValueError, match="finite"):
        solve_dual_cone_qp(torch.tensor([1.0, float("inf"), 0.0]), gramian)
    with pytest.raises(ValueError, match="positive semi-definite"):
        solve_dual_cone_qp(torch.eye(3), -gramian)


def test_not_converging_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dual_cone, "_max_rounds", lambda m: 1)
    monkeypatch.setattr(dual_cone_small, "_SMALL_MAX_ROUNDS", 1)
    monkeypatch.setattr(dual_cone_small, "_LEAST_INDEX_ROUNDS_PER_SIZE", 0)
    gramian = _normalized(sample_matrix(10, 10, seed=0))
    with pytest.raises(RuntimeError, match="did not converge"):
        solve_dual_cone_qp(_upgrad_lower(10, torch.Generator().manual_seed(0)), gramian)


def test_check_solver() -> None:
    assert check_solver("active_set") == "active_set"
    assert SOLVERS == ("active_set", "quadprog")
    with pytest.raises(ValueError, match="'active_set', 'quadprog'"):
        check_solver("cvxpy")


def test_missing_quadprog_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import torchjd.aggregation._dual_cone_quadprog as backend

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "quadprog" else real_find_spec(name, *args),
    )
    with pytest.raises(ImportError, match=r'pip install "torchjd\[quadprog\]"'):
        check_solver("quadprog")

    def fail(name: str) -> None:
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(backend.importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r'pip install "torchjd\[quadprog\]"'):
        project_weights(torch.ones(2), torch.eye(2), "quadprog")


def test_check_epsilon() -> None:
    assert check_epsilon("reg_eps", 0) == 0
    assert check_epsilon("reg_eps", 1e-4) == 1e-4
    for bad in (-1e-4, float("nan"), float("inf"), "0.1", None, True):
        with pytest.raises(ValueError, match="reg_eps"):
            check_epsilon("reg_eps", bad)


def test_slightly_asymmetric_gramians() -> None:
    # J @ J.T in float32 is not exactly symmetric; the solver uses its symmetric part.
    matrix = sample_matrix(40, 30, seed=6, dtype=torch.float32)
    gramian = matrix @ matrix.T
    gramian = gramian / gramian.trace() + 1e-4 * torch.eye(40)
    lower = _upgrad_lower(40, torch.Generator().manual_seed(0)).float()
    solution = solve_dual_cone_qp(lower, gramian)
    symmetric = ((gramian + gramian.T) / 2).double()
    assert_close(solution, solve_dual_cone_qp(lower.double(), symmetric), atol=0.0, rtol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_enumeration_agrees_with_pivoting(m: int) -> None:
    for seed, kind in enumerate(["full", "rank_one", "duplicated", "non_conflicting"]):
        for reg_eps in (1e-4, 0.0):
            gramian = _normalized(sample(kind, m, 3, seed=seed), reg_eps)  # type: ignore[arg-type]
            lower = torch.randn(
                6, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m)
            )
            problem = _Problem(gramian, lower)
            enumerated = dual_cone._solve_by_enumeration(problem)
            assert enumerated is not None
            pivoted = dual_cone._solve_gathered(problem)
            assert kkt_violation(gramian, lower, lower + enumerated) <= 1e-12
            assert kkt_violation(gramian, lower, lower + pivoted) <= 1e-12
            if reg_eps > 0:  # The minimiser is unique.
                assert_close(enumerated, pivoted, atol=1e-14, rtol=1e-10)


@pytest.mark.parametrize(("kind", "m", "n", "seed"), [("full", 18, 10, 10), ("full", 39, 12, 40)])
def test_singular_problems_where_pivoting_stalls(kind: str, m: int, n: int, seed: int) -> None:
    # Rank-deficient Gramians of conflicting rows, without regularisation: block pivoting cycles
    # there; the rows switch to the Lawson-Hanson mode, which ends.
    gramian = _normalized(sample(kind, m, n, seed=seed), reg_eps=0.0)  # type: ignore[arg-type]
    lower = _upgrad_lower(m, torch.Generator().manual_seed(seed))
    for solve in (dual_cone._solve_gathered, _solve_masked):
        solution = lower + solve(_Problem(gramian, lower))
        assert kkt_violation(gramian, lower, solution) <= 1e-9


def test_gramians_rounded_to_low_precision() -> None:
    # A rank-deficient Gramian rounded to bfloat16 has slightly negative eigenvalues: they are
    # taken for rounding errors and clipped (the solution is then that of the clipped Gramian).
    matrix = sample_matrix(6, 3, seed=0)
    rounded = (matrix @ matrix.T).to(torch.bfloat16).double()
    assert torch.linalg.eigvalsh(rounded).min() < 0
    lower = _upgrad_lower(6, torch.Generator().manual_seed(0))
    solution = solve_dual_cone_qp(lower, rounded)
    clipped = dual_cone._positive_semi_definite_part(rounded / rounded.trace())
    assert torch.linalg.eigvalsh(clipped).min() > -1e-15
    assert kkt_violation(clipped, lower, solution) <= 1e-9
    with pytest.raises(dual_cone._IndefiniteGramianError):
        _solve_masked(_Problem(rounded / rounded.trace(), lower))
    masked = lower + _solve_masked(_Problem(clipped, lower))
    assert_close(masked, solution, atol=1e-12, rtol=1e-9)


def test_clearly_indefinite_gramians_are_rejected() -> None:
    gramian = torch.diag(torch.tensor([1.0, 1.0, -0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive semi-definite"):
        solve_dual_cone_qp(torch.eye(3, dtype=torch.float64), gramian)


# A trace-normalised Gramian of rank 4 (of an 8 x 9 matrix of scale 1e-12, found by Hypothesis):
# without regularisation, Lawson and Hanson's method made an index enter and leave F forever.
_CYCLING_GRAMIAN = (
    (
        "0x1.d3ebc7242c30dp-3",
        "0x1.d751205db8cdbp-6",
        "-0x1.9a60a695cd2a3p-5",
        "-0x1.fe0b5bc9d3470p-5",
        "0x1.fd5c435d96ee3p-4",
        "0x1.490f0eee0523ep-4",
        "-0x1.2a1d745c945a4p-3",
        "0x1.f582e69b9bf67p-4",
    ),
    (
        "0x1.d751205db8cd8p-6",
        "0x1.04cbfe9283426p-4",
        "-0x1.111390334eac7p-5",
        "-0x1.e6886488518ffp-5",
        "0x1.0b90b15ef4894p-5",
        "-0x1.876fded31162cp-5",
        "-0x1.5b1ab3106a82ep-4",
        "-0x1.50be724879acbp-5",
    ),
    (
        "-0x1.9a60a695cd2a3p-5",
        "-0x1.111390334eac6p-5",
        "0x1.7dc24a5a6c2fcp-4",
        "0x1.00bbcaaa731e7p-5",
        "-0x1.c4ada42e0b7bep-9",
        "0x1.ea32abe0eeafap-7",
        "0x1.583655b68a271p-5",
        "-0x1.f10a9d5fc7974p-6",
    ),
    (
        "-0x1.fe0b5bc9d3470p-5",
        "-0x1.e6886488518ffp-5",
        "0x1.00bbcaaa731e7p-5",
        "0x1.5c747fc9fd936p-4",
        "-0x1.e96df955be94ep-5",
        "0x1.105cf722184a4p-6",
        "0x1.c2d06e70695f4p-4",
        "0x1.8e775c04fa6b2p-5",
    ),
    (
        "0x1.fd5c435d96ee3p-4",
        "0x1.0b90b15ef4894p-5",
        "-0x1.c4ada42e0b7bep-9",
        "-0x1.e96df955be94ep-5",
        "0x1.7056b086c0799p-4",
        "0x1.18aaa8655b9c2p-5",
        "-0x1.c81e49579db28p-4",
        "0x1.a8f2572e84518p-6",
    ),
    (
        "0x1.490f0eee0523ep-4",
        "-0x1.876fded31162cp-5",
        "0x1.ea32abe0eeafap-7",
        "0x1.105cf722184a4p-6",
        "0x1.18aaa8655b9c2p-5",
        "0x1.6ec73380216ebp-4",
        "0x1.7072b47b32bf1p-8",
        "0x1.4a42a8763d02ep-4",
    ),
    (
        "-0x1.2a1d745c945a4p-3",
        "-0x1.5b1ab3106a82dp-4",
        "0x1.583655b68a271p-5",
        "0x1.c2d06e70695f2p-4",
        "-0x1.c81e49579db28p-4",
        "0x1.7072b47b32bf2p-8",
        "0x1.6c098cd23203dp-3",
        "0x1.145a3bae183c5p-7",
    ),
    (
        "0x1.f582e69b9bf64p-4",
        "-0x1.50be724879acbp-5",
        "-0x1.f10a9d5fc7974p-6",
        "0x1.8e775c04fa6b2p-5",
        "0x1.a8f2572e84517p-6",
        "0x1.4a42a8763d02ep-4",
        "0x1.145a3bae183c5p-7",
        "0x1.60fa55aaba547p-3",
    ),
)


def test_lawson_hanson_does_not_cycle_on_a_singular_gramian() -> None:
    entries = [[float.fromhex(entry) for entry in row] for row in _CYCLING_GRAMIAN]
    gramian = torch.tensor(entries, dtype=torch.float64)
    lower = torch.diag(torch.full((8,), 0.125, dtype=torch.float64))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _general_path(monkeypatch)
        solution = solve_dual_cone_qp(lower, gramian)
    assert kkt_violation(gramian, lower, solution) <= 1e-9
    symmetric = (gramian + gramian.T) / 2
    masked = lower + _solve_masked(_Problem(symmetric / symmetric.trace(), lower))
    assert kkt_violation(gramian, lower, masked) <= 1e-9


def _general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dual_cone_small, "TINY_MAX_SIZE", 0)
    monkeypatch.setattr(dual_cone_small, "SMALL_MAX_SIZE", 0)


@settings(max_examples=30, deadline=None)
@given(_problems(max_rows=32), st.sampled_from([1e-4, 0.0]))
def test_small_paths_agree_with_the_general_path(
    problem: tuple[Tensor, Tensor], reg_eps: float
) -> None:
    gramian, lower = problem
    if reg_eps == 0.0:
        gramian = gramian - 1e-4 * torch.eye(gramian.shape[0], dtype=gramian.dtype)
    fast = solve_dual_cone_qp(lower, gramian)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _general_path(monkeypatch)
        general = solve_dual_cone_qp(lower, gramian)
    tolerance = 1e-11 if reg_eps > 0 else 1e-9
    assert kkt_violation(gramian, lower, fast) <= tolerance
    assert kkt_violation(gramian, lower, general) <= tolerance
    if reg_eps > 0:  # The minimiser is unique.
        assert_close(fast, general, atol=0.0, rtol=1e-9, scale=solution_scale(general, lower))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 9, 17, 32])
@pytest.mark.parametrize(("norm_eps", "reg_eps"), [(1e-4, 1e-4), (0.0, 0.0), (1e3, 1e-4)])
def test_fused_normalisation_of_the_small_paths(m: int, norm_eps: float, reg_eps: float) -> None:
    # project_small and project_tiny normalise and regularise G themselves, as UPGrad does; with
    # norm_eps=1e3, the trace is below norm_eps and G' = reg_eps I.
    matrix = sample("full", m, m + 2, seed=m)  # type: ignore[arg-type]
    gramian = matrix @ matrix.T
    lower = torch.randn(4, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    regularized = regularize(normalize(gramian, norm_eps), reg_eps)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _general_path(monkeypatch)
        expected = solve_dual_cone_qp(lower, regularized)
    small = dual_cone_small.project_small(lower, gramian, norm_eps, reg_eps)
    assert small is not None
    assert_close(small, expected, atol=1e-15, rtol=1e-9)
    tiny = dual_cone_small.project_tiny(lower.tolist(), gramian, norm_eps, reg_eps)
    if m <= dual_cone_small.TINY_MAX_SIZE:
        assert tiny is not None
        assert_close(torch.tensor(tiny, dtype=torch.float64), expected, atol=1e-15, rtol=1e-9)
    else:
        assert tiny is None


def test_small_paths_leave_hard_inputs_to_the_general_path() -> None:
    lower = torch.eye(3, dtype=torch.float64)
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.1], dtype=torch.float64))
    not_finite = torch.eye(3, dtype=torch.float64)
    not_finite[0, 1] = float("nan")
    zero = torch.zeros(3, 3, dtype=torch.float64)
    for gramian in (indefinite, not_finite, zero):
        assert dual_cone_small.solve_small(lower, gramian) is None
        assert dual_cone_small.solve_tiny(lower.tolist(), gramian.tolist()) is None
        # With norm_eps=0, a zero trace is not "small": G / 0 is left to the general path.
        assert dual_cone_small.project_small(lower, gramian, 0.0, 0.0) is None
        assert dual_cone_small.project_tiny(lower.tolist(), gramian, 0.0, 0.0) is None
    big = torch.eye(dual_cone_small.SMALL_MAX_SIZE + 1, dtype=torch.float64)
    assert dual_cone_small.project_small(big, big, 1e-4, 1e-4) is None
    # Through the solver: the general path gives the errors (or the clipped or trivial answer).
    with pytest.raises(ValueError, match="positive semi-definite"):
        solve_dual_cone_qp(lower, indefinite)
    with pytest.raises(ValueError, match="finite"):
        solve_dual_cone_qp(lower, not_finite)
    assert_close(solve_dual_cone_qp(lower, zero), lower, atol=0.0, rtol=0.0)


def test_small_paths_keep_the_dtype_and_carry_no_gradient() -> None:
    matrix = sample("full", 4, 3, seed=0)  # type: ignore[arg-type]
    gramian = (matrix @ matrix.T).float().requires_grad_()
    lower = torch.eye(4, requires_grad=True)
    small = dual_cone_small.project_small(lower, gramian, 1e-4, 1e-4)
    assert small is not None
    assert small.dtype == torch.float32 and not small.requires_grad
    assert (small >= lower).all()


def _conflicting(m: int, centring: float, seed: int) -> Tensor:
    """A Jacobian whose rows conflict like per-sample gradients in IWRM: random rows with
    ``centring`` times their mean removed (at 0.8, about 90% of the constraints of UPGrad's
    problems are inactive at the solution, as on the Gramians of real models)."""
    rows = torch.randn(m, 2 * m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return rows - centring * rows.mean(dim=0, keepdim=True)


class _ComplementCalls:
    """Counts the rows solved through the complement of their free set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, always: bool | None) -> None:
        self.rows = 0
        solve = dual_cone._ComplementSolver.solve
        is_cheaper = dual_cone._ComplementSolver.is_cheaper

        def counting_solve(
            solver: dual_cone._ComplementSolver, free: Tensor, rhs: Tensor, start: Tensor
        ) -> tuple[Tensor, Tensor]:
            self.rows += free.shape[0]
            return solve(solver, free, rhs, start)

        def forced(solver: dual_cone._ComplementSolver, free: Tensor) -> Tensor:
            if always is None:
                return is_cheaper(solver, free)
            return torch.full((free.shape[0],), always)

        monkeypatch.setattr(dual_cone._ComplementSolver, "solve", counting_solve)
        monkeypatch.setattr(dual_cone._ComplementSolver, "is_cheaper", forced)


@pytest.mark.parametrize("m", [40, 96])
@pytest.mark.parametrize("centring", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("upgrad", [True, False])
def test_complement_path_agrees_with_the_gathered_path(
    m: int, centring: float, upgrad: bool
) -> None:
    gramian = _normalized(_conflicting(m, centring, seed=m))
    generator = torch.Generator().manual_seed(m)
    lower = (
        _upgrad_lower(m, generator)
        if upgrad
        else torch.randn(5, m, dtype=torch.float64, generator=generator)
    )
    solutions = []
    for always in (True, False):
        with pytest.MonkeyPatch.context() as monkeypatch:
            _general_path(monkeypatch)
            calls = _ComplementCalls(monkeypatch, always)
            solutions.append(solve_dual_cone_qp(lower, gramian))
        assert (calls.rows > 0) == always
    through_complement, gathered = solutions
    assert kkt_violation(gramian, lower, through_complement) <= 1e-11
    assert_close(
        through_complement, gathered, atol=0.0, rtol=1e-10, scale=solution_scale(gathered, lower)
    )


def test_complement_path_is_chosen_when_most_constraints_are_inactive() -> None:
    gramian = _normalized(_conflicting(96, 0.8, seed=0))
    lower = _upgrad_lower(96, torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _ComplementCalls(monkeypatch, always=None)
        solution = solve_dual_cone_qp(lower, gramian)
    assert calls.rows >= 96
    assert ((solution - lower) > 0).double().mean() > 0.8
    assert kkt_violation(gramian, lower, solution) <= 1e-11


def test_complement_path_needs_a_well_conditioned_gramian() -> None:
    lower = torch.eye(40, dtype=torch.float64)
    singular = _normalized(_conflicting(40, 1.0, seed=0), reg_eps=0.0)
    ill_conditioned = _normalized(sample_matrix(40, 20, seed=0), reg_eps=1e-12)
    well_conditioned = _normalized(_conflicting(40, 1.0, seed=0))
    for gramian in (singular, ill_conditioned):
        assert dual_cone._ComplementSolver.of(_Problem(gramian, lower)) is None
    assert dual_cone._ComplementSolver.of(_Problem(well_conditioned, lower)) is not None
    # Rank-deficient Gramians are then solved by the gathered systems.
    solution = solve_dual_cone_qp(lower, singular)
    assert kkt_violation(singular, lower, solution) <= 1e-9


def _make_odd_complement_rows_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the complement solve report every other row of each chunk as failed (with NaNs)."""
    solve_chunk = dual_cone._ComplementSolver._solve_chunk

    def failing_odd_rows(
        solver: dual_cone._ComplementSolver,
        free: Tensor,
        rhs: Tensor,
        start: Tensor,
        size: int,
        sync_free: bool = False,
    ) -> tuple[Tensor, Tensor]:
        solutions, failed = solve_chunk(solver, free, rhs, start, size, sync_free)
        failed = failed.clone()
        failed[1::2] = True
        return solutions.clone().index_fill_(0, torch.arange(1, free.shape[0], 2), math.nan), failed

    monkeypatch.setattr(dual_cone._ComplementSolver, "_solve_chunk", failing_odd_rows)


def test_failed_complement_rows_are_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    gramian = _normalized(_conflicting(48, 0.8, seed=1))
    lower = _upgrad_lower(48, torch.Generator().manual_seed(1))
    expected = solve_dual_cone_qp(lower, gramian)
    _make_odd_complement_rows_fail(monkeypatch)
    solution = solve_dual_cone_qp(lower, gramian)
    assert kkt_violation(gramian, lower, solution) <= 1e-11
    assert_close(solution, expected, atol=0.0, rtol=1e-10, scale=solution_scale(expected, lower))


def test_systems_are_solved_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    gramian = _normalized(_conflicting(64, 0.5, seed=2))
    lower = _upgrad_lower(64, torch.Generator().manual_seed(2))
    expected = solve_dual_cone_qp(lower, gramian)
    monkeypatch.setattr(dual_cone, "_CHUNK_ELEMENTS", 2000)
    assert len(list(dual_cone._chunks_by_size(torch.tensor([0, 3, 30, 9, 40, 40])))) == 4
    solution = solve_dual_cone_qp(lower, gramian)
    assert_close(solution, expected, atol=0.0, rtol=1e-10, scale=solution_scale(expected, lower))


@settings(max_examples=25, deadline=None)
@given(_problems(max_rows=40))
def test_complement_path_on_sampled_problems(problem: tuple[Tensor, Tensor]) -> None:
    gramian, lower = problem
    solutions = []
    for always in (True, False):
        with pytest.MonkeyPatch.context() as monkeypatch:
            _general_path(monkeypatch)
            _ComplementCalls(monkeypatch, always)
            solutions.append(solve_dual_cone_qp(lower, gramian))
    through_complement, gathered = solutions
    assert kkt_violation(gramian, lower, through_complement) <= 1e-11
    assert_close(
        through_complement, gathered, atol=0.0, rtol=1e-9, scale=solution_scale(gathered, lower)
    )


def _nearly_orthogonal(m: int, seed: int) -> Tensor:
    """A Jacobian whose rows are nearly orthogonal before centring: most entries of its Gramian
    are negative (about 80% at ``m = 64``, like the Gramians of real IWRM steps, where the warm
    start guesses the free sets from their signs)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(m, m, dtype=torch.float64, generator=generator)
    rows = torch.cat([torch.eye(m, dtype=torch.float64), 0.05 * noise], dim=1)
    return rows - rows.mean(dim=0, keepdim=True)


class _HostReads:
    """Counts the reads of tensor values into Python (the host synchronisations on a device) and
    the rounds of the masked path."""

    _METHODS = ("tolist", "item", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        self.rounds = 0
        for name in self._METHODS:
            monkeypatch.setattr(Tensor, name, self._counting(getattr(Tensor, name)))
        pivot = dual_cone._Rows.pivot

        def counting_pivot(rows: dual_cone._Rows, *args: object, **kwargs: object) -> None:
            self.rounds += 1
            pivot(rows, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(dual_cone._Rows, "pivot", counting_pivot)

    def _counting(self, method: Callable[..., object]) -> Callable[..., object]:
        def counting(tensor: Tensor, *args: object) -> object:
            self.reads += 1
            return method(tensor, *args)

        return counting


@pytest.mark.parametrize(
    ("centring", "upgrad"), [(0.0, True), (0.8, True), (1.0, False), (None, True)]
)
def test_masked_path_reads_the_host_once_per_round(centring: float | None, upgrad: bool) -> None:
    m = 64
    matrix = _nearly_orthogonal(m, seed=3) if centring is None else _conflicting(m, centring, 3)
    gramian = _normalized(matrix)
    generator = torch.Generator().manual_seed(3)
    lower = (
        _upgrad_lower(m, generator)
        if upgrad
        else torch.randn(6, m, dtype=torch.float64, generator=generator)
    )
    problem = _Problem(gramian, lower)
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _ComplementCalls(monkeypatch, always=None)
        counter = _HostReads(monkeypatch)
        offsets = _solve_masked(problem)
    assert counter.rounds >= 2
    assert counter.reads == counter.rounds
    assert calls.rows == 0  # The masked path calls the complement solver's chunks directly.
    solution = lower + offsets
    assert kkt_violation(gramian, lower, solution) <= 1e-11
    expected = solve_dual_cone_qp(lower, gramian)
    assert_close(solution, expected, atol=0.0, rtol=1e-10, scale=solution_scale(expected, lower))


class _MaskedSystems:
    """Records the sizes of the systems solved by the masked path, per kind."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.complement: list[tuple[int, int]] = []
        self.gathered: list[tuple[int, int]] = []
        solve_chunk = dual_cone._ComplementSolver._solve_chunk
        fixed_size_solve = dual_cone._fixed_size_free_solve

        def recording_chunk(
            solver: dual_cone._ComplementSolver,
            free: Tensor,
            rhs: Tensor,
            start: Tensor,
            size: int,
            sync_free: bool = False,
        ) -> tuple[Tensor, Tensor]:
            assert (~free).sum(dim=1).max() <= size
            self.complement.append((free.shape[0], size))
            return solve_chunk(solver, free, rhs, start, size, sync_free)

        def recording_solve(
            padded: Tensor, ridge: float, free: Tensor, rhs: Tensor, start: Tensor, size: int
        ) -> tuple[Tensor, Tensor]:
            assert free.sum(dim=1).max() <= size
            self.gathered.append((free.shape[0], size))
            return fixed_size_solve(padded, ridge, free, rhs, start, size)

        monkeypatch.setattr(dual_cone._ComplementSolver, "_solve_chunk", recording_chunk)
        monkeypatch.setattr(dual_cone, "_fixed_size_free_solve", recording_solve)


def test_masked_path_solves_small_systems_when_most_constraints_are_inactive() -> None:
    m = 96
    gramian = _normalized(_conflicting(m, 0.8, seed=0))
    lower = _upgrad_lower(m, torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as monkeypatch:
        systems = _MaskedSystems(monkeypatch)
        solution = lower + _solve_masked(_Problem(gramian, lower))
    assert sum(rows for rows, _ in systems.complement) >= m
    # Each row's system has the size of its complement (at most about a fifth of m here), not m.
    assert max(size for _, size in systems.complement) <= m // 4
    assert all(size < m for _, size in systems.gathered)
    assert kkt_violation(gramian, lower, solution) <= 1e-11
    expected = solve_dual_cone_qp(lower, gramian)
    assert_close(solution, expected, atol=0.0, rtol=1e-10, scale=solution_scale(expected, lower))


def test_masked_path_without_the_complement_on_a_singular_gramian() -> None:
    gramian = _normalized(_conflicting(40, 1.0, seed=0), reg_eps=0.0)
    lower = _upgrad_lower(40, torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as monkeypatch:
        systems = _MaskedSystems(monkeypatch)
        solution = lower + _solve_masked(_Problem(gramian, lower))
    assert systems.complement == []
    assert kkt_violation(gramian, lower, solution) <= 1e-9


def test_masked_path_gathers_failed_complement_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    gramian = _normalized(_conflicting(48, 0.8, seed=1))
    lower = _upgrad_lower(48, torch.Generator().manual_seed(1))
    expected = solve_dual_cone_qp(lower, gramian)
    gathered_rows = []
    fixed_size_solve = dual_cone._fixed_size_free_solve

    def recording_solve(
        padded: Tensor, ridge: float, free: Tensor, rhs: Tensor, start: Tensor, size: int
    ) -> tuple[Tensor, Tensor]:
        gathered_rows.append(free.shape[0])
        return fixed_size_solve(padded, ridge, free, rhs, start, size)

    _make_odd_complement_rows_fail(monkeypatch)
    monkeypatch.setattr(dual_cone, "_fixed_size_free_solve", recording_solve)
    solution = lower + _solve_masked(_Problem(gramian, lower))
    assert sum(gathered_rows) > 0
    assert kkt_violation(gramian, lower, solution) <= 1e-11
    assert_close(solution, expected, atol=0.0, rtol=1e-10, scale=solution_scale(expected, lower))


@pytest.mark.parametrize("sign_start", [False, True])
def test_sync_free_warm_start_makes_the_same_guess(sign_start: bool) -> None:
    # Without a host read, the masked path chooses between the sign guess and the ADMM on the
    # device; the CPU path reads the fraction of negative entries of G u and skips the ADMM.
    matrix = _nearly_orthogonal(64, seed=4) if sign_start else _conflicting(64, 0.8, seed=4)
    gramian = _normalized(matrix)
    lower = torch.cat(
        [
            _upgrad_lower(64, torch.Generator().manual_seed(4)),
            -torch.ones(1, 64, dtype=torch.float64),  # The sign guess makes every index free.
        ]
    )
    problem = _Problem(gramian, lower)
    fraction = (problem.linear < 0).double().mean()
    assert (fraction >= dual_cone._SIGN_START_FRACTION) == sign_start
    guess = dual_cone._warm_start(problem, lower, problem.linear)
    sync_free_guess = dual_cone._warm_start(problem, lower, problem.linear, sync_free=True)
    assert torch.equal(guess, sync_free_guess)
    assert torch.equal(guess, problem.linear < 0) == sign_start


@settings(max_examples=25, deadline=None)
@given(_problems(max_rows=40), st.sampled_from([1e-4, 0.0]))
def test_masked_path_on_sampled_problems(problem: tuple[Tensor, Tensor], reg_eps: float) -> None:
    gramian, lower = problem
    if reg_eps == 0.0:
        gramian = gramian - 1e-4 * torch.eye(gramian.shape[0], dtype=gramian.dtype)
    masked = lower + _solve_masked(_Problem(gramian, lower))
    tolerance = 1e-11 if reg_eps > 0 else 1e-9
    assert kkt_violation(gramian, lower, masked) <= tolerance
    if reg_eps > 0:  # The minimiser is unique.
        expected = solve_dual_cone_qp(lower, gramian)
        assert_close(masked, expected, atol=0.0, rtol=1e-9, scale=solution_scale(expected, lower))


@pytest.mark.parametrize("m", [40, 96])
def test_masked_path_matches_quadprog_on_conflicting_rows(m: int) -> None:
    pytest.importorskip("quadprog")
    for centring in (0.0, 0.8, 1.0):
        gramian = _normalized(_conflicting(m, centring, seed=m))
        lower = _upgrad_lower(m, torch.Generator().manual_seed(m))
        masked = lower + _solve_masked(_Problem(gramian, lower))
        expected = _quadprog_solution(gramian, lower)
        assert_close(masked, expected, atol=0.0, rtol=1e-9, scale=solution_scale(expected, lower))


def test_masked_path_solves_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    gramian = _normalized(_conflicting(64, 0.5, seed=2))
    lower = _upgrad_lower(64, torch.Generator().manual_seed(2))
    expected = lower + _solve_masked(_Problem(gramian, lower))
    monkeypatch.setattr(dual_cone, "_MASKED_CHUNK_ELEMENTS", 1000)
    chunks = list(dual_cone._masked_chunks(torch.arange(64) % 3 == 0, 22, size=10, m=64))
    assert [len(chunk) for chunk in chunks] == [10, 10, 2]
    assert torch.equal(torch.cat(chunks), torch.arange(0, 64, 3))
    with pytest.MonkeyPatch.context() as patch:
        systems = _MaskedSystems(patch)
        solution = lower + _solve_masked(_Problem(gramian, lower))
    assert max(rows for rows, _ in systems.complement + systems.gathered) < 64
    assert_close(solution, expected, atol=0.0, rtol=1e-10, scale=solution_scale(expected, lower))


def test_rows_that_cycle_on_a_singular_gramian_are_accepted() -> None:
    # Found by hypothesis: a rank-10 Gramian (26 rows, reg_eps=0) on which rounding errors made
    # the careful mode cycle through a few free sets (on both paths) until the round limit.
    data = torch.load(Path(__file__).parent / "data" / "cycling_problem.pt")
    lower = data["lower"]
    gramian = normalize(data["gramian"], data["norm_eps"])
    symmetric = (gramian + gramian.T) / 2
    symmetric = symmetric / symmetric.trace()
    solution = solve_dual_cone_qp(lower, gramian)
    assert kkt_violation(symmetric, lower, solution) <= 1e-9
    masked = lower + _solve_masked(_Problem(symmetric, lower))
    assert kkt_violation(symmetric, lower, masked) <= 1e-9
