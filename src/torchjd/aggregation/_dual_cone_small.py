"""The dual-cone projections of small problems on the CPU, where the overhead of each torch
operation (about a microsecond) costs more than the arithmetic.

Two paths, both block principal pivoting from the free sets ``{j : (G u)_j < 0}`` (see
:mod:`torchjd.aggregation._dual_cone` for the problem and the method): few small problems
(``m ≤ 8``, at most 16 problems and ``rows · m² ≤ 256``) in plain Python floats, one at a time;
problems with ``m ≤ 32`` batched, with about ten torch operations per round (full-size systems
where a huge diagonal penalty pins the indices off the free set, no ridge), from ``m = 20`` after a
warm start of a few splitting iterations. Rows that still cycle after a few rounds (rounding errors
of ill-conditioned systems) go on with Murty's least-index rule, one index per round. Both paths
certify their result (finite input, positive semi-definite ``G``, non-singular systems, optimality
up to rounding errors) and otherwise return ``None``, leaving the problem to the general solver.
UPGrad and DualProj call them with their normalisation (trace, ``norm_eps``, ``reg_eps``) fused in.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
from torch import Tensor

# The same constants as the general solver's: sign tests accept errors of up to this many times
# `m * ε` times the natural scale, and G + ridge I (relative to the trace) must factorise for G to
# be taken as positive semi-definite.
_TOLERANCE = 4.0
_RIDGE = 1e-10
# Up to this size, the CPU path first tries a lean block principal pivoting (few torch operations
# per round, no warm start): at small sizes, the per-operation overhead of torch is the cost.
SMALL_MAX_SIZE = 32
_SMALL_MAX_ROUNDS = 8
# Then (if that is at least _CYCLING_ROUNDS) the rows that cycle go on with one index per round,
# up to this many times m rounds.
_CYCLING_ROUNDS = 4
_LEAST_INDEX_ROUNDS_PER_SIZE = 3
# From this size, the small path starts from a guess by a few iterations of a splitting method.
WARM_START_MIN_SIZE = 20
_WARM_START_ITERATIONS = 12
# Up to this size and number of problems, and at most _TINY_MAX_WORK for rows * m², the CPU path
# first solves the problems one by one in plain Python floats (IEEE float64, like torch's): faster
# than the sequence of torch operations of the small path there (measured: UPGrad up to m = 6,
# DualProj up to m = 8).
TINY_MAX_SIZE = 8
TINY_MAX_ROWS = 16
_TINY_MAX_WORK = 256
# Added to the diagonal of the systems off the free sets (see `solve_small`).
_PENALTY = 1e24
_FLOAT64_EPS = 2.0**-52


def project_tiny(
    lower: list[list[float]], gramian: Tensor, norm_eps: float, reg_eps: float
) -> list[list[float]] | None:
    """The projections of UPGrad and DualProj for tiny CPU problems, all in Python floats: each
    torch operation costs microseconds, more than the whole solve at this size. For the vectors
    ``u`` of ``lower`` (``m`` entries each), return the minimisers of ``vᵀ G' v`` subject to
    ``v ≥ u``, with ``G' = G / trace(G) + reg_eps I`` (``reg_eps I`` if the trace is below
    ``norm_eps``); or ``None`` if the problem is not tiny, not on the CPU, or not certified solved
    (then the caller uses the general path).
    """
    m = gramian.shape[0]
    if gramian.device.type != "cpu" or not fits_tiny(len(lower), m):
        return None
    # Reading a CPU tensor into Python floats is a copy, not a synchronisation.
    entries = gramian.detach().tolist()
    scale = _normalisation_scale(sum(entries[i][i] for i in range(m)), norm_eps)
    if scale is None:
        return None
    regularized = [[entry * scale for entry in row] for row in entries]
    for i in range(m):
        regularized[i][i] += reg_eps
    return solve_tiny(lower, regularized)


def _normalisation_scale(trace: float, norm_eps: float) -> float | None:
    """The factor of UPGrad's normalisation ``G / trace(G)`` (zero if the trace is below
    ``norm_eps``), or ``None`` for a trace that is not finite and positive (left to the general
    path, which raises)."""
    if trace < norm_eps:
        return 0.0
    if trace > 0.0 and math.isfinite(trace):
        return 1.0 / trace
    return None


def solve_tiny(lower: list[list[float]], gramian: list[list[float]]) -> list[list[float]] | None:
    """CPU path for tiny problems, in Python floats: the same block principal pivoting as
    :func:`solve_small`, one problem at a time, with a Cholesky factorisation of ``G_FF`` per
    free set (shared by the rows). Returns the minimisers ``v``, or ``None`` when the result cannot
    be certified cheaply (non-finite or not clearly positive semi-definite input, a singular
    system, no convergence in a few rounds): the general path then decides."""
    m = len(gramian)
    if not fits_tiny(len(lower), m):
        return None
    columns = range(m)
    trace = sum(gramian[i][i] for i in columns)
    # Infinite or NaN if an entry is (or if the sum overflows: left to the general path too).
    total = sum(map(sum, gramian)) + sum(map(sum, lower))
    if not (trace > 0.0 and math.isfinite(total)):
        return None
    half_inverse = 0.5 / trace
    g = [
        [(entry + transposed) * half_inverse for entry, transposed in zip(row, column)]
        for row, column in zip(gramian, zip(*gramian))
    ]
    # Not clearly positive semi-definite: the general path raises or clips.
    ridged = [row.copy() for row in g]
    for i in columns:
        ridged[i][i] += _RIDGE
    if _cholesky(ridged, tuple(columns)) is None:
        return None
    unit_error = _TOLERANCE * m * _FLOAT64_EPS
    rounds = _SMALL_MAX_ROUNDS
    if _SMALL_MAX_ROUNDS >= _CYCLING_ROUNDS:
        rounds += _LEAST_INDEX_ROUNDS_PER_SIZE * m
    factors: dict[tuple[int, ...], list[list[float]] | None] = {}
    solutions = []
    for u in lower:
        linear = [0.0] * m
        for k in columns:
            if u[k] != 0.0:
                value = u[k]
                linear = [entry + value * g_kj for entry, g_kj in zip(linear, g[k])]
        lower_scale = sum(map(abs, u))
        free = [entry < 0.0 for entry in linear]
        for round_ in range(rounds):
            indices = tuple(j for j in columns if free[j])
            if indices in factors:
                factor = factors[indices]
            else:
                factor = factors[indices] = _cholesky(g, indices)
            if factor is None:
                return None
            free_offsets = _cholesky_solve(factor, [-linear[j] for j in indices])
            offsets = [0.0] * m
            products = linear
            for index, value in zip(indices, free_offsets):
                offsets[index] = value
                products = [entry + value * g_ij for entry, g_ij in zip(products, g[index])]
            tolerance = unit_error * (lower_scale + sum(map(abs, free_offsets)))
            wrong = [
                (offset if is_free else product) < -tolerance
                for offset, product, is_free in zip(offsets, products, free)
            ]
            if not any(wrong):
                break
            if round_ < _SMALL_MAX_ROUNDS:
                free = [is_free != is_wrong for is_free, is_wrong in zip(free, wrong)]
            else:  # Cycling: Murty's least-index rule, as in `_least_index_pivoting`.
                first = wrong.index(True)
                free[first] = not free[first]
        else:
            return None
        if any(abs(products[j]) > tolerance for j in indices):
            return None
        solutions.append([bound + max(offset, 0.0) for bound, offset in zip(u, offsets)])
    return solutions


def fits_tiny(rows: int, size: int) -> bool:
    """Whether ``rows`` problems of size ``size`` go to the Python path (see `TINY_MAX_SIZE`): a
    caller can test it before reading the lower bounds into Python floats."""
    return size <= TINY_MAX_SIZE and rows <= TINY_MAX_ROWS and rows * size * size <= _TINY_MAX_WORK


def _cholesky(matrix: list[list[float]], indices: tuple[int, ...]) -> list[list[float]] | None:
    """The lower Cholesky factor of ``matrix[indices][:, indices]``, or ``None`` if a pivot is not
    positive (or not finite)."""
    factor: list[list[float]] = []
    for a, index in enumerate(indices):
        row = matrix[index]
        factor_a: list[float] = []
        for c in range(a):
            factor_c = factor[c]
            factor_a.append(
                (row[indices[c]] - sum(map(operator.mul, factor_a, factor_c))) / factor_c[c]
            )
        pivot = row[index] - sum(map(operator.mul, factor_a, factor_a))
        if not (pivot > 0.0 and math.isfinite(pivot)):
            return None
        factor_a.append(math.sqrt(pivot))
        factor.append(factor_a)
    return factor


def _cholesky_solve(factor: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve ``L Lᵀ x = rhs`` for the lower triangular ``L`` given by its rows."""
    size = len(rhs)
    forward: list[float] = []
    for a in range(size):
        factor_a = factor[a]
        forward.append((rhs[a] - sum(map(operator.mul, factor_a, forward))) / factor_a[a])
    solution = [0.0] * size
    for a in range(size - 1, -1, -1):
        dot = sum(factor[t][a] * solution[t] for t in range(a + 1, size))
        solution[a] = (forward[a] - dot) / factor[a][a]
    return solution


def project_small(lower: Tensor, gramian: Tensor, norm_eps: float, reg_eps: float) -> Tensor | None:
    """The projections of UPGrad and DualProj for small CPU problems: for the vectors ``u`` of
    ``lower`` (``[b, m]``, the dtype of ``gramian``), the minimisers of ``vᵀ G' v`` subject to
    ``v ≥ u``, with ``G' = G / trace(G) + reg_eps I`` (``reg_eps I`` if the trace is below
    ``norm_eps``), by :func:`solve_small`, the normalisation fused with the solver's own; or
    ``None`` if the problem is not small, not on the CPU, or not certified solved (then the caller
    uses the general path)."""
    m = gramian.shape[0]
    if gramian.device.type != "cpu" or m > SMALL_MAX_SIZE or m == 0:
        return None
    # Not differentiable: detached (cheaper than `no_grad`, same effect).
    lower = lower.detach()
    offsets = solve_small(lower.to(torch.float64), gramian.detach(), norm_eps, reg_eps)
    if offsets is None:
        return None
    return offsets.add_(lower).to(lower.dtype)


def solve_small(
    lower: Tensor, gramian: Tensor, norm_eps: float | None = None, reg_eps: float = 0.0
) -> Tensor | None:
    """CPU path for small ``m``, with as few torch operations as possible (each costs about a
    microsecond, more than the arithmetic): block principal pivoting from the free sets
    ``{j : (G u)_j < 0}``, every round one batched Cholesky factorisation of full-size systems,
    exact (no ridge); from ``m = WARM_START_MIN_SIZE``, from the guess of :func:`_warm_start`; rows
    that cycle finish with :func:`_least_index_pivoting`. Returns the offsets ``x = v − u``, or
    ``None`` if the result cannot be certified cheaply (non-finite or not clearly positive
    semi-definite input, a singular system, no convergence): the general path then decides.
    With ``norm_eps``, ``G`` is first replaced by ``G / trace(G) + reg_eps I`` (``reg_eps I`` if
    the trace is below ``norm_eps``), as UPGrad and DualProj do.

    The systems are ``(G + M D) x = −G u`` with ``D`` the diagonal indicator of the indices off
    the free set ``F`` and ``M`` huge: ``x`` is zero off ``F`` and solves ``G_FF x_F = −(G u)_F``
    up to ``1/M``, far below rounding errors, without masking the matrices or the right-hand sides.
    The sign tests read ``x + y`` (with ``y = G v``): ``x`` on ``F`` and ``y`` off ``F``, the other
    term being zero there up to rounding errors. One more system, ``G + δ I`` (``δ`` a tiny ridge),
    rides along in the batch: its factorisation certifies that ``G`` is not indefinite.

    A returned ``x`` satisfies the optimality conditions up to rounding errors: ``x ≥ 0`` (after
    clamping entries that are negative by rounding), ``y = G v ≥ 0``, ``y = 0`` on the free set."""
    m = gramian.shape[0]
    # A read on the CPU, not a synchronisation; the scalars of the normalisation are then free.
    trace = float(torch.trace(gramian))
    scale, ridge = 1.0, 0.0
    if norm_eps is not None:
        normalisation = _normalisation_scale(trace, norm_eps)
        if normalisation is None:
            return None
        scale, ridge = normalisation, reg_eps
    total = scale * trace + m * ridge
    if not (total > 0.0 and math.isfinite(total)):
        return None
    b = lower.shape[0]
    identity = _identity(m)
    gramian = gramian.to(torch.float64)
    # Symmetric part, trace 1: |G_ij| ≤ 1 then bounds the rounding errors of the products.
    gramian = torch.add(gramian, gramian.T).mul_(0.5 * scale / total)
    if ridge > 0.0:
        gramian.add_(identity, alpha=ridge / total)
    # The last row (u = 0, never free) is the certificate's system G + δ I.
    lower = torch.nn.functional.pad(lower, (0, 0, 0, 1))
    linear = lower @ gramian
    neg_linear = torch.neg(linear).unsqueeze_(2)
    shifted = torch.add(gramian, identity)
    diagonal = gramian.diagonal()
    penalised = torch.add(diagonal, _penalties(b + 1, m))
    systems = gramian.expand(b + 1, m, m).clone()
    unit_error = _TOLERANCE * m * _FLOAT64_EPS
    neg_lower_scale = torch.linalg.vector_norm(lower, 1, dim=1, keepdim=True).mul_(-unit_error)
    free = _warm_start(lower, gramian, identity) if m >= WARM_START_MIN_SIZE else linear < 0
    for _ in range(_SMALL_MAX_ROUNDS):
        info, offsets, both, neg_tolerance = _solve_free_systems(
            systems, free, diagonal, penalised, linear, neg_linear, shifted, neg_lower_scale
        )
        wrong = both < neg_tolerance
        if not wrong.any().item():
            break
        free = free ^ wrong
    else:
        # After that many rounds, the rows still wrong cycle (rounding errors of ill-conditioned
        # systems flip indices that are zero on both sides): they go on, alone, with one index
        # per round.
        if _SMALL_MAX_ROUNDS < _CYCLING_ROUNDS:
            return None
        rows = wrong.any(dim=1).nonzero().squeeze_(1)
        pivoted = _least_index_pivoting(
            free[rows], linear[rows], gramian, shifted, penalised[rows], neg_lower_scale[rows]
        )
        if pivoted is None:
            return None
        free[rows], offsets[rows], both[rows], neg_tolerance[rows], failed = pivoted
        info = info.add_(failed)
    # Certificate: non-singular free systems, G + δ I positive definite, y_F at rounding level.
    if info.any().item():
        return None
    # On F, `both - offsets` is y; a non-finite input makes a NaN here (also off F: the mask
    # multiplies by zero).
    residual = both.sub_(offsets).abs_().add_(neg_tolerance).mul_(free)
    if not residual.amax().item() <= 0.0:
        return None
    return torch.where(free[:b], offsets[:b].clamp_min_(0.0), _zero())


def _solve_free_systems(
    systems: Tensor,
    free: Tensor,
    diagonal: Tensor,
    penalised: Tensor,
    linear: Tensor,
    neg_linear: Tensor,
    shifted: Tensor,
    neg_lower_scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One round of :func:`solve_small`: write the diagonals of the penalised ``systems``
    (``diagonal`` on ``F``, ``penalised`` off it), solve them for the right-hand sides
    ``neg_linear`` (``−G u``), and return the factorisations' ``info``, the offsets ``x``,
    ``x + y`` (``shifted`` is ``G + I``) and the negated tolerances of the sign tests."""
    m = free.shape[1]
    torch.where(free, diagonal, penalised, out=systems.diagonal(dim1=1, dim2=2))
    factor, info = torch.linalg.cholesky_ex(systems)
    offsets = torch.cholesky_solve(neg_linear, factor).squeeze_(2)
    both = torch.addmm(linear, offsets, shifted)
    # The tolerance of the sign tests: m ε (|x| + |u|)₁, as |G_ij| ≤ 1 after normalisation.
    neg_tolerance = torch.add(
        neg_lower_scale,
        torch.linalg.vector_norm(offsets, 1, dim=1, keepdim=True),
        alpha=-_TOLERANCE * m * _FLOAT64_EPS,
    )
    return info, offsets, both, neg_tolerance


def _least_index_pivoting(
    free: Tensor,
    linear: Tensor,
    gramian: Tensor,
    shifted: Tensor,
    penalised: Tensor,
    neg_lower_scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """The rounds of :func:`solve_small` with Murty's least-index rule: only the first index on
    the wrong side moves, which ends in finitely many rounds for a positive definite ``G`` (in
    exact arithmetic; here at most `_LEAST_INDEX_ROUNDS_PER_SIZE` times ``m``). Returns the free
    sets, offsets, ``x + y``, tolerances and the count of failed factorisations, or ``None``."""
    rows, m = free.shape
    neg_linear = torch.neg(linear).unsqueeze_(2)
    diagonal = gramian.diagonal()
    systems = gramian.expand(rows, m, m).clone()
    indices = torch.arange(m)
    failed = torch.zeros((), dtype=torch.int32)
    for _ in range(_LEAST_INDEX_ROUNDS_PER_SIZE * m):
        info, offsets, both, neg_tolerance = _solve_free_systems(
            systems, free, diagonal, penalised, linear, neg_linear, shifted, neg_lower_scale
        )
        wrong = both < neg_tolerance
        if not wrong.any().item():
            return free, offsets, both, neg_tolerance, failed.add_(info.sum())
        first = wrong.to(torch.uint8).argmax(dim=1, keepdim=True)
        free = free ^ (wrong & (indices == first))
    return None


def _warm_start(lower: Tensor, gramian: Tensor, identity: Tensor) -> Tensor:
    """Guess the free sets from a few iterations of Douglas-Rachford splitting (ADMM on the dual)
    on all the problems at once, each one matrix product with ``(I + 2G/ρ)⁻¹``: the rounds of
    pivoting it saves cost more, from ``m ≈ 20``. ``ρ`` is the geometric mean of the eigenvalues
    of ``G`` (from the determinant), which balances the two halves on ill-conditioned ``G``."""
    factor = torch.linalg.cholesky_ex(torch.add(gramian, identity, alpha=_RIDGE))[0]
    # A read on the CPU (not a synchronisation); NaN (failed factorisation) falls back to 1 / m.
    geometric_mean = math.exp(2.0 * float(factor.diagonal().log().mean()))
    if not geometric_mean > 0.0 or not math.isfinite(geometric_mean):
        geometric_mean = 1.0 / gramian.shape[0]
    resolvent = torch.cholesky_inverse(
        torch.linalg.cholesky_ex(torch.add(identity, gramian, alpha=1.0 / geometric_mean))[0]
    )
    point = projected = lower
    for _ in range(_WARM_START_ITERATIONS):
        reflected = torch.addmm(point, point, resolvent, beta=-1.0, alpha=2.0)
        projected = torch.maximum(lower, reflected)
        point = torch.add(projected, torch.sub(point, reflected), alpha=0.5)
    return projected > lower


@functools.cache
def _penalties(rows: int, size: int) -> Tensor:
    """The penalty on the diagonal off the free sets, for ``rows - 1`` problems, and the ridge of
    the certificate's system in the last row (cached: never written to)."""
    penalties = torch.full((rows, size), _PENALTY, dtype=torch.float64)
    penalties[-1] = _RIDGE
    return penalties


@functools.cache
def _zero() -> Tensor:
    """A float64 zero on the CPU (cached: never written to)."""
    return torch.zeros((), dtype=torch.float64)


@functools.cache
def _identity(size: int) -> Tensor:
    """The float64 identity matrix on the CPU (cached: it is never written to)."""
    return torch.eye(size, dtype=torch.float64)
