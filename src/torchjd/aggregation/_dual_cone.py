r"""Exact, batched projections onto the dual cone of the rows of a matrix, from their Gramian.

For a Gramian ``G = J Jᵀ`` (``m x m``) and a vector ``u`` of length ``m``, the quadratic program

.. math::

    \min_v \; v^\top G v \quad \text{subject to} \quad v \geq u \text{ (entry-wise)}

has a minimiser ``v`` such that ``Jᵀv`` is the projection of ``Jᵀu`` onto the dual cone
``{x : J x ≥ 0}`` (Proposition 1 of the Jacobian descent paper). UPGrad solves it for every
``u = u_i e_i``, DualProj for one ``u``.

Method. With ``x = v − u`` and ``y = G v = G x + G u`` (half the Lagrange multipliers), the
optimality conditions are the linear complementarity problem ``x ≥ 0, y ≥ 0, x ⊙ y = 0``. All the
problems share ``G`` and are solved together, each with its own free set ``F`` (the indices where
``x`` may be positive); every round solves ``G_FF x_F = −(G u)_F`` (``x = 0`` off ``F``) for all of
them at once, and a row is done when its solution satisfies the optimality conditions, up to
rounding errors (which proves it is the minimiser).

1. Warm start: 40 iterations of over-relaxed ADMM (the splitting of OSQP) on all the problems at
   once, each one matrix product, guess the first free sets.
2. Block principal pivoting (Júdice and Pires, 1994; Kim and Park, 2011): move every index on the
   wrong side (``x < 0`` in ``F``, ``y < 0`` off ``F``) to the other side. It usually ends in one
   to three rounds after the warm start.
3. A row whose pivoting stalls (Júdice and Pires's counting rule) or that cannot be solved exactly
   on its free set (a singular or badly conditioned ``G``) switches to the active-set method of
   Lawson and Hanson (for non-negative least squares, in Gram form): finite and robust to rank
   deficiency, but one index per round.

Numerics. The solver works in float64, on the symmetric part of ``G`` divided by its trace (the
minimiser does not depend on the scale of ``G``). The systems are factorised with a ridge of
``1e-10`` (relative to the trace) and the solutions refined against the exact systems: the ridged
solutions, which solve the problem regularised by ``δ ‖v − u‖²`` (a P-matrix problem even for a
singular ``G``), drive the pivoting; the refined ones are tested. So a positive definite ``G`` gets
the exact solution, and a singular one (a rank-deficient Jacobian with ``reg_eps=0``) a minimiser.

Small problems. On the CPU, small problems first go to the lean paths of
:mod:`torchjd.aggregation._dual_cone_small` (where the cost is the overhead of each torch
operation, not the arithmetic), which leave what they cannot certify to the general method below.

Devices. On the CPU, problems with ``m ≤ 5`` try all ``2^m`` free sets at once; otherwise the rows
still in progress are gathered into systems of the size of their free sets (in batches of rows of
similar sizes that fit in the cache) and the loop stops as soon as all are done, with a few host
reads per round (free on the CPU). When ``G`` is well conditioned (as UPGrad's ``reg_eps`` makes
it), rows whose free set is large are solved through its complement instead, with ``G⁻¹`` computed
once (see :class:`_ComplementSolver`): on real IWRM Gramians about 90% of the indices are free, and
a row then costs a small factorisation and a few products instead of a ``|F|³/3`` one.

On other devices (:func:`_solve_masked`), the warm start chooses between its two guesses on the
device, and one read back to the host per round (typically two to four per call, as the warm start
leaves one to three rounds) says whether to stop and which systems to solve: how many rows go
through the complement (if ``G`` is well conditioned, checked on the device) and how many through
``G_FF``, and the largest system of each kind; each kind is then solved for its rows with systems
of that one size, padded with the identity. That read is the only host synchronisation: at most
one more per round than reading only the stop flag at rounds 0, 2, 4, 8, ... would need, the price
of systems about ten times smaller than ``m`` on real IWRM Gramians instead of ``m x m`` ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Literal, get_args

import torch
from torch import Tensor

from . import _dual_cone_small as small
from ._utils import check_is_square_matrix, normalize, regularize

SolverName = Literal["active_set", "quadprog"]
SOLVERS: tuple[SolverName, ...] = get_args(SolverName)

# The linear systems are factorised with this (relative to the trace of the Gramian) added to their
# diagonal, which bounds the amplification of rounding errors by nearly singular systems; the
# refinement steps then solve the exact systems.
_RIDGE = 1e-10
_REFINEMENTS = 2
# On the CPU, refinement goes on while it still reduces the residuals, up to this many steps.
_MAX_REFINEMENTS = 30
# Sign tests accept errors of up to this many times `m * ε` times the natural scale.
_TOLERANCE = 4.0
# Gramians with negative eigenvalues down to this (relative to the trace) are taken for rounding
# errors (a Gramian computed in low precision) and clipped; below, they are an error.
_INDEFINITE_TOLERANCE = 1e-2
# See `_Rows._lawson_hanson_step`: how many times the tolerance a multiplier may exceed it for a
# row to be accepted when Lawson and Hanson's method cannot make progress.
_STUCK_TOLERANCE = 1e4
# The same for a row that cycles (see `_Rows.pivot`): about 1e-9 relative at m = 30, the errors a
# singular G (a rank-deficient Jacobian with reg_eps=0) amplifies with the fixed two refinement
# steps of the accelerator path.
_CYCLING_TOLERANCE = 1e5
# Rounds of full exchange allowed without progress before switching to the careful mode.
_PATIENCE = 3
# Free sets of the careful mode remembered to find cycles (see `_Rows.pivot`).
_HISTORY = 8
# Most elements in one batch of gathered systems (CPU): 1 MiB in float64. Larger batches are fewer
# calls, but their temporaries are fresh blocks that the allocator takes from (and returns to) the
# OS, and the page faults of touching them cost more (measured: 2^19 elements, 30-50% slower).
_CHUNK_ELEMENTS = 2**17
# Most elements in one batch of systems on other devices (the masked path): 256 MiB in float64.
_MASKED_CHUNK_ELEMENTS = 2**25
# Iterations and over-relaxation of the ADMM that guesses the first free sets.
_WARM_START_ITERATIONS = 40
_RELAXATION = 1.6
# On the CPU, when at least this fraction of the entries of G u is negative, the first free sets
# are those entries instead (see `_warm_start`).
_SIGN_START_FRACTION = 0.75
# Up to this size, the CPU path tries all the 2^m free sets at once (fewer operations than rounds).
_ENUMERATION_MAX_SIZE = 5


def check_solver(solver: object) -> SolverName:
    """Return ``solver`` if it is the name of a dual-cone solver, else raise a ``ValueError``.

    ``"quadprog"`` also needs the optional dependency ``quadprog``: its absence raises an
    ``ImportError`` saying how to install it.
    """
    if solver not in SOLVERS:
        raise ValueError(
            f"Parameter `solver` should be one of {', '.join(map(repr, SOLVERS))}. Found "
            f"`solver = {solver!r}`."
        )
    if solver == "quadprog":
        from ._dual_cone_quadprog import check_quadprog_available

        check_quadprog_available()
    return solver


def project_onto_dual_cone(
    lower: Tensor, gramian: Tensor, norm_eps: float, reg_eps: float, solver: SolverName
) -> Tensor:
    """The projections of UPGrad and DualProj: for each vector ``u`` (row of ``lower``, ``[k, m]``),
    the minimiser of ``vᵀ G' v`` subject to ``v ≥ u``, with ``G' = G / trace(G) + reg_eps I``
    (``reg_eps I`` if the trace is below ``norm_eps``).

    With our solver, tiny and small CPU problems first go to the lean paths (whose normalisation
    is fused with the solver's), and fall back to the general solver when those do not certify
    their result.

    :returns: The minimisers, ``[k, m]``, of the dtype and device of ``lower``.
    """
    if solver == "active_set":
        if lower.device.type == "cpu" and small.fits_tiny(lower.shape[0], gramian.shape[0]):
            solutions = small.project_tiny(lower.tolist(), gramian, norm_eps, reg_eps)
            if solutions is not None:
                return torch.tensor(solutions, dtype=lower.dtype).reshape(lower.shape)
        projections = small.project_small(lower, gramian, norm_eps, reg_eps)
        if projections is not None:
            return projections
    regularized = regularize(normalize(gramian, norm_eps), reg_eps)
    return project_weights(lower, regularized, solver)


def project_weights(weights: Tensor, gramian: Tensor, solver: SolverName) -> Tensor:
    """Return, for every vector ``u`` along the last dimension of ``weights``, the minimiser of
    ``vᵀ G v`` subject to ``v ≥ u``.

    :param weights: The vectors ``u``, of shape ``[..., m]``.
    :param gramian: The ``m x m`` positive semi-definite matrix ``G``.
    :param solver: ``"active_set"`` (ours, the default of the aggregators) or ``"quadprog"``.
    :returns: The minimisers, of the shape, dtype and device of ``weights``.
    """
    if solver == "quadprog":
        from ._dual_cone_quadprog import project_weights_quadprog

        return project_weights_quadprog(weights, gramian)
    return solve_dual_cone_qp(weights, gramian)


def solve_dual_cone_qp(weights: Tensor, gramian: Tensor) -> Tensor:
    """Return, for every vector ``u`` along the last dimension of ``weights``, the minimiser of
    ``vᵀ G v`` subject to ``v ≥ u``, computed by the batched active-set method of this module.

    The result satisfies ``v ≥ u`` exactly, and the other optimality conditions up to rounding
    errors. Computed in float64 (and returned in the dtype of ``weights``), without gradient.
    Slightly negative eigenvalues of ``G`` (down to ``−1%`` of its trace: the rounding errors of a
    Gramian computed in half precision) are clipped to zero.

    :param weights: The vectors ``u``, of shape ``[..., m]``.
    :param gramian: The ``m x m`` positive semi-definite matrix ``G``.
    :raises ValueError: If the shapes do not match, if ``G`` or ``u`` has non-finite entries, or
        if ``G`` has an eigenvalue below ``−1%`` of its trace.
    """
    _check_shapes(weights, gramian)
    m = gramian.shape[0]
    if weights.numel() == 0:
        return weights.detach().clone()
    on_cpu = gramian.device.type == "cpu" and weights.device.type == "cpu"
    if on_cpu and small.fits_tiny(weights.numel() // max(m, 1), m):
        # Reading CPU tensors into Python floats is a copy, not a synchronisation.
        solutions = small.solve_tiny(
            weights.detach().reshape(-1, m).tolist(), gramian.detach().tolist()
        )
        if solutions is not None:
            return torch.tensor(solutions, dtype=weights.dtype).reshape(weights.shape)
    with torch.no_grad():
        work = torch.float64
        lower = weights.detach().reshape(-1, m).to(work)
        g = gramian.detach().to(work)
        if on_cpu and m <= small.SMALL_MAX_SIZE:
            offsets = small.solve_small(lower, g)
            if offsets is not None:
                return (lower + offsets).reshape(weights.shape).to(weights.dtype)
        if on_cpu:
            _check_finite(lower, g)
        # Products like J @ J.T are not exactly symmetric in floating point; the factorisations
        # read one triangle, the products both.
        g = (g + g.T) / 2
        trace = g.diagonal().sum()
        g = g / torch.where(trace > 0, trace, torch.ones_like(trace))
        problem = _Problem(g, lower)
        if on_cpu:
            if bool(problem.indefinite):
                problem = _Problem(_positive_semi_definite_part(g), lower)
            offsets = _solve_by_enumeration(problem) if m <= _ENUMERATION_MAX_SIZE else None
            if offsets is None:
                offsets = _solve_gathered(problem)
        else:
            try:
                offsets = _solve_masked(problem)
            except _IndefiniteGramianError:
                offsets = _solve_masked(_Problem(_positive_semi_definite_part(g), lower))
        return (lower + offsets).reshape(weights.shape).to(weights.dtype)


class _IndefiniteGramianError(Exception):
    """Raised by the masked solver when the Gramian is found not to be positive semi-definite."""


def _positive_semi_definite_part(gramian: Tensor) -> Tensor:
    """Return the trace-normalised ``gramian`` with its negative eigenvalues replaced by zero, if
    they are the rounding errors of a Gramian computed in low precision (down to
    ``−_INDEFINITE_TOLERANCE`` times the trace); else raise a ``ValueError``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gramian)
    if bool(eigenvalues.min() < -_INDEFINITE_TOLERANCE * gramian.diagonal().sum().abs()):
        raise ValueError(
            "Parameter `gramian` should be positive semi-definite, but it has an eigenvalue of "
            f"{eigenvalues.min().item():.3g} times its trace."
        )
    part = (eigenvectors * eigenvalues.clamp_min(0.0)) @ eigenvectors.T
    part = (part + part.T) / 2
    trace = part.diagonal().sum()
    return part / torch.where(trace > 0, trace, torch.ones_like(trace))


def _check_shapes(weights: Tensor, gramian: Tensor) -> None:
    check_is_square_matrix(gramian)
    if weights.ndim == 0 or weights.shape[-1] != gramian.shape[0]:
        raise ValueError(
            "Parameter `weights` should have a last dimension of the size of `gramian`. Found "
            f"`weights.shape = {weights.shape}` and `gramian.shape = {gramian.shape}`."
        )


def _check_finite(lower: Tensor, gramian: Tensor) -> None:
    if bool(torch.isfinite(gramian).all() & torch.isfinite(lower).all()):
        return
    name = "gramian" if not bool(torch.isfinite(gramian).all()) else "weights"
    raise ValueError(f"Parameter `{name}` should have finite entries only.")


class _Problem:
    """The data shared by all the rounds: ``G`` (trace-normalised), the lower bounds ``U`` (one
    problem per row), ``Q = U G`` and the scales of the convergence tests."""

    def __init__(self, gramian: Tensor, lower: Tensor) -> None:
        m = gramian.shape[0]
        eps = torch.finfo(gramian.dtype).eps
        self.gramian = gramian
        self.lower = lower
        self.linear = lower @ gramian
        self.ridge = _RIDGE
        # |G_ij| <= s_i s_j: the error of an entry of G x is at most about m ε s_i Σ_j s_j |x_j|.
        self.root_diagonal = gramian.diagonal().clamp_min(0.0).sqrt()
        self.floored_root_diagonal = self.root_diagonal.clamp_min(math.sqrt(self.ridge))
        self.unit_error = _TOLERANCE * max(m, 1) * eps
        # Used by the warm start, and to find Gramians that are not positive semi-definite.
        identity = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
        self.factor, info = torch.linalg.cholesky_ex(gramian + self.ridge * identity)
        self.indefinite = info > 0


class _Rows:
    """The state of a batch of problems (rows), each with a free set ``F``. Every round solves
    ``G_FF x_F = −(G u)_F`` for every row with a ridged factorisation: the ridged solution solves
    the problem regularised by ``δ ‖v − u‖²`` (a P-matrix complementarity problem, even for a
    singular ``G``), and its refinement ``x`` the exact one; a row is solved when ``x`` satisfies
    the exact optimality conditions.

    Rows start in the fast mode, block principal pivoting driven by the ridged solution. A row
    whose pivoting stalls, or whose regularised problem is solved but not the exact one (a singular
    or badly conditioned ``G``), switches to the careful mode: the active-set method of Lawson and
    Hanson (for non-negative least squares, here in Gram form). It keeps a feasible point, moves it
    towards the solution on ``F``; when that solution is feasible, ``F`` gains the index with the
    most negative multiplier, else loses the blocking index. It is finite and keeps ``G_FF``
    non-singular, at the cost of one index per round."""

    def __init__(self, problem: _Problem) -> None:
        b, m = problem.lower.shape
        device = problem.lower.device
        self.lower = problem.lower
        self.linear = problem.linear
        self.free = torch.zeros(b, m, dtype=torch.bool, device=device)
        self.previous_free = self.free
        self.best = torch.full((b,), m + 1, dtype=torch.long, device=device)
        self.patience = torch.full((b,), _PATIENCE, dtype=torch.long, device=device)
        self.careful = torch.zeros(b, dtype=torch.bool, device=device)
        # The index that entered F in the last careful step, and the rows accepted at a point
        # where Lawson and Hanson's method can make no progress (see `_lawson_hanson_step`).
        self.entered = torch.zeros(b, m, dtype=torch.bool, device=device)
        self.accepted = torch.zeros(b, dtype=torch.bool, device=device)
        self.entry_violation = torch.full((b,), math.inf, dtype=problem.lower.dtype, device=device)
        # Signatures of the last free sets of the careful mode, to find the rows that cycle.
        self.history = torch.full((b, _HISTORY), math.nan, dtype=problem.lower.dtype, device=device)
        self.signature_weights = _signature_weights(m, problem.lower.dtype, device)
        self.point = torch.zeros_like(problem.lower)
        # Offsets x = v − u and products G v, exact and ridged (G v + δ x).
        self.offsets = torch.zeros_like(problem.lower)
        self.products = problem.linear.clone()
        self.regularized_offsets = self.offsets
        self.regularized_products = self.products

    # What `pivot` changes (see `pivot_state`).
    _PIVOT_FIELDS = (
        "free",
        "previous_free",
        "best",
        "patience",
        "careful",
        "entered",
        "accepted",
        "entry_violation",
        "history",
        "point",
    )
    # Everything per row (see `keep`).
    _FIELDS = (
        "lower",
        "linear",
        *_PIVOT_FIELDS,
        "offsets",
        "products",
        "regularized_offsets",
        "regularized_products",
    )

    def pivot_state(self) -> tuple[Tensor, ...]:
        """The fields that :meth:`pivot` changes, to :meth:`restore` them."""
        return tuple(getattr(self, name) for name in self._PIVOT_FIELDS)

    def restore(self, rows: Tensor, state: tuple[Tensor, ...]) -> None:
        """Undo the pivoting of the ``rows`` (a mask), back to ``state``, without a host read."""
        for name, old in zip(self._PIVOT_FIELDS, state, strict=True):
            new = getattr(self, name)
            mask = rows.reshape(rows.shape + (1,) * (new.ndim - 1))
            setattr(self, name, torch.where(mask, old, new))

    def keep(self, mask: Tensor) -> None:
        """Keep only the rows of ``mask``."""
        for name in self._FIELDS:
            setattr(self, name, getattr(self, name)[mask])

    def assess(self, problem: _Problem) -> tuple[Tensor, Tensor]:
        """Return the mask of the indices on the wrong side (``x < 0`` in ``F`` or ``y < 0`` off
        ``F``, beyond rounding errors) for the regularised problem, and, per row, whether the row
        is solved: nothing on the wrong side and ``y_F = 0`` for the exact problem."""
        offset_tolerance, product_tolerance = self._tolerances(problem, self.offsets)
        free = self.free
        wrong = torch.where(
            free,
            self.regularized_offsets < -offset_tolerance,
            self.regularized_products < -product_tolerance,
        )
        failed = torch.where(
            free,
            (self.offsets < -offset_tolerance) | (self.products.abs() > product_tolerance),
            self.products < -product_tolerance,
        )
        return wrong, ~failed.any(dim=1) | self.accepted

    def _tolerances(self, problem: _Problem, offsets: Tensor) -> tuple[Tensor, Tensor]:
        """Per entry, the rounding-level tolerances on ``x`` and on ``y = G v``."""
        absolute = offsets.abs() + self.lower.abs()
        scale = problem.unit_error * (absolute @ problem.root_diagonal).unsqueeze(1)
        return scale / problem.floored_root_diagonal, scale * problem.root_diagonal

    def pivot(
        self,
        problem: _Problem,
        wrong: Tensor,
        first: bool,
        careful_rows: bool,
        sync_free: bool = False,
    ) -> None:
        """Choose the next free sets (of the unsolved rows): the warm start's guess in the first
        round, else one step of the row's mode. ``careful_rows=False`` (the caller knows that no
        row is, or is about to be, in the careful mode) skips the computations of that mode;
        ``sync_free`` makes the warm start's choice without a host read."""
        self.previous_free = self.free
        if first:
            self.free = _warm_start(problem, self.lower, self.linear, sync_free)
            return
        count = wrong.sum(dim=1)
        improved = count < self.best
        stalled = ~improved & (self.patience <= 0)
        switching = ~self.careful & ((count == 0) | stalled)
        careful = self.careful.unsqueeze(1)
        # Fast mode: flip all the wrong indices (Júdice and Pires's counting rule decides when
        # that has stalled).
        self.best = torch.where(improved, count, self.best)
        self.patience = torch.where(improved, _PATIENCE, self.patience - 1)
        fast_free = self.free ^ wrong
        if not careful_rows:
            self.free = fast_free
            return
        # Careful mode, entered from the current solution's feasible part.
        signature = (self.free.to(self.history.dtype) @ self.signature_weights).unsqueeze(1)
        revisited = (self.history == signature).any(dim=1)
        # Only the careful mode's free sets count (the fast mode may revisit sets by design).
        self.history = torch.where(
            careful, torch.cat([self.history[:, 1:], signature], dim=1), math.nan
        )
        point, careful_free, entered, stuck = self._lawson_hanson_step(problem)
        # On a singular G, rounding errors can also make the method cycle through a few free
        # sets (an index enters, then another, then both leave; exact arithmetic would not): a
        # row back at a free set where its point is feasible and the entering multiplier is
        # within `_CYCLING_TOLERANCE` times the tolerance is accepted there, like a stuck one.
        # Its free set stays, so that the next round solves for that point again.
        cycling = self.careful & revisited & (self.entry_violation <= _CYCLING_TOLERANCE)
        self.accepted = self.accepted | (self.careful & stuck) | cycling
        self.entered = entered & careful
        entering = switching.unsqueeze(1)
        entry_point = self.offsets.clamp_min(0.0) * self.free
        self.point = torch.where(entering, entry_point, torch.where(careful, point, self.point))
        self.free = torch.where(
            entering,
            self.free & (entry_point > 0),
            torch.where(careful & ~cycling.unsqueeze(1), careful_free, fast_free),
        )
        self.free = torch.where(cycling.unsqueeze(1), self.previous_free, self.free)
        self.careful = self.careful | switching

    def _lawson_hanson_step(self, problem: _Problem) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step of the careful mode, from the solution ``z`` on ``F`` of the last round."""
        solution, products, point, free = self.offsets, self.products, self.point, self.free
        offset_tolerance, product_tolerance = self._tolerances(problem, solution)
        blocked = free & (solution < -offset_tolerance)
        any_blocked = blocked.any(dim=1, keepdim=True)
        # Move towards z until the first coordinate reaches zero; drop it from F.
        safe_gap = torch.where(blocked, point - solution, torch.ones_like(point))
        ratios = torch.where(blocked, point / safe_gap, torch.full_like(point, math.inf))
        step = ratios.amin(dim=1, keepdim=True).clamp(0.0, 1.0)
        blocking = blocked & (ratios <= step)
        moved = torch.where(blocking, 0.0, point + step * (solution - point)).clamp_min(0.0)
        moved_free = free & ~blocking & (moved > 0)
        # z is feasible: it becomes the point, and the most negative multiplier enters F.
        candidates = ~free & (products < -product_tolerance)
        most_negative = torch.where(candidates, products, math.inf).argmin(dim=1, keepdim=True)
        positions = torch.arange(free.shape[1], device=free.device)
        entering = (positions == most_negative) & candidates
        accepted = solution.clamp_min(0.0) * free
        # On a singular or badly conditioned G, an index whose multiplier is negative by a little
        # more than rounding errors can enter and block at once (z_j < 0, no move): the method
        # would cycle. The point is then optimal up to errors amplified by the conditioning, and
        # is accepted if the multiplier was within `_STUCK_TOLERANCE` times the tolerance.
        stuck = (blocking & self.entered).any(dim=1) & (step.squeeze(1) <= 0)
        stuck &= self.entry_violation <= _STUCK_TOLERANCE
        violation = torch.where(entering, -products / product_tolerance, 0.0).sum(dim=1)
        self.entry_violation = torch.where(any_blocked.squeeze(1), math.inf, violation)
        return (
            torch.where(any_blocked, moved, accepted),
            torch.where(any_blocked, moved_free, free | entering),
            entering & ~any_blocked,
            stuck,
        )

    def needs_care(self, wrong: Tensor) -> bool:
        """Whether a row is, or may enter, the careful mode in this round (a host read)."""
        count = wrong.sum(dim=1)
        stalled = (count >= self.best) & (self.patience <= 0)
        return bool((self.careful | (count == 0) | stalled).any())

    def refinement_start(self) -> Tensor:
        """Where the refinement starts: the current exact solution for the rows whose free set
        did not change in this round, NaN (meaning "from the ridged solution") for the others."""
        unchanged = (self.free == self.previous_free).all(dim=1, keepdim=True)
        return torch.where(unchanged, self.offsets, math.nan)

    def right_hand_side(self) -> Tensor:
        """The right-hand side of the systems, zero off ``F``."""
        return -self.linear * self.free

    def set_offsets(self, problem: _Problem, regularized: Tensor, refined: Tensor) -> None:
        gramian = problem.gramian
        self.offsets = refined
        self.products = refined @ gramian + self.linear
        self.regularized_offsets = regularized
        if regularized is refined:
            self.regularized_products = torch.add(self.products, regularized, alpha=problem.ridge)
        else:
            self.regularized_products = (
                regularized @ gramian + self.linear + problem.ridge * regularized
            )


@functools.cache
def _signature_weights_cpu(m: int, dtype: torch.dtype) -> Tensor:
    generator = torch.Generator().manual_seed(m)
    return torch.rand(m, generator=generator, dtype=dtype) + 1.0


def _signature_weights(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Fixed random weights whose products with free sets (as 0/1 vectors) tell them apart."""
    return _signature_weights_cpu(m, dtype).to(device)


def _warm_start(
    problem: _Problem, lower: Tensor, linear: Tensor, sync_free: bool = False
) -> Tensor:
    """Guess the free sets of the rows of ``lower`` (``linear`` = ``lower G``) from a few
    iterations of over-relaxed ADMM (the splitting of OSQP) on all of them at once: each
    iteration is one product with the precomputed ``ρ (2G + ρI)⁻¹``, so the guess costs a few
    matrix products and saves most of the rounds of pivoting. ``ρ`` is the geometric mean of the
    eigenvalues of ``2G`` (from the determinant), which balances the primal and dual progress on
    ill-conditioned Gramians.

    On the CPU, when most entries of ``G u`` are negative (the rows conflict, as per-sample
    gradients do in IWRM: about 90% of them), the free sets ``{j : (G u)_j < 0}`` are guessed
    instead, for free: there, they are nearly exact, and the ADMM would cost more than the rounds
    it saves. Elsewhere (e.g. random Gramians, half of the entries), that guess would cost several
    more rounds. With ``sync_free`` (the masked path), both guesses are made and the choice is a
    ``torch.where`` on the device (the ADMM is cheap on an accelerator), without a host read."""
    negative = linear < 0
    sign_start = negative.to(linear.dtype).mean() >= _SIGN_START_FRACTION
    if not sync_free and linear.device.type == "cpu" and bool(sign_start):
        return negative
    gramian = problem.gramian
    m = gramian.shape[0]
    identity = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    geometric_mean = torch.exp(2.0 * problem.factor.diagonal().log().mean())
    fallback = gramian.diagonal().mean().clamp_min(problem.ridge)
    usable = ~problem.indefinite & torch.isfinite(geometric_mean) & (geometric_mean > 0)
    rho = 2.0 * torch.where(usable, geometric_mean, fallback)
    system_factor = torch.linalg.cholesky_ex(2.0 * gramian + rho * identity)[0]
    # Only a guess: single precision halves the cost of the products.
    step = (torch.cholesky_inverse(system_factor) * rho).float()
    lower = lower.float()
    z = lower
    w = torch.zeros_like(lower)
    for _ in range(_WARM_START_ITERATIONS):
        v = torch.addmm(z, z - w, step, beta=1.0 - _RELAXATION, alpha=_RELAXATION)
        z_next = torch.maximum(lower, v + w)
        w = w + v - z_next
        z = z_next
    guess = z > lower
    return torch.where(sign_start, negative, guess) if sync_free else guess


def _solve_by_enumeration(problem: _Problem) -> Tensor | None:
    """For small ``m``: solve every problem on each of the ``2^m`` free sets at once (one
    factorisation per free set, shared by the rows) and keep, per row, the first solution that
    satisfies the optimality conditions; ``None`` if a row has none (left to the general path)."""
    gramian, lower, linear = problem.gramian, problem.lower, problem.linear
    m = gramian.shape[0]
    subsets = (torch.arange(2**m).unsqueeze(1) >> torch.arange(m)) & 1 == 1
    systems = torch.where(subsets.unsqueeze(2) & subsets.unsqueeze(1), gramian, 0.0)
    systems.diagonal(dim1=1, dim2=2).add_((~subsets).to(gramian.dtype))
    free = subsets.unsqueeze(2)
    rhs = torch.where(free, -linear.T, 0.0)
    _, offsets = _refined_solve(
        systems.unsqueeze(1),
        (problem.ridge * subsets.to(gramian.dtype)).unsqueeze(1),
        rhs.mT,
        torch.full_like(rhs.mT, math.nan),
    )
    offsets = offsets.mT  # [2^m, m, b]
    products = gramian @ offsets + linear.T
    scale = problem.unit_error * (problem.root_diagonal @ (offsets.abs() + lower.abs().T))
    offset_tolerance = scale.unsqueeze(1) / problem.floored_root_diagonal.unsqueeze(1)
    product_tolerance = scale.unsqueeze(1) * problem.root_diagonal.unsqueeze(1)
    optimal = torch.where(
        free,
        (offsets >= -offset_tolerance) & (products.abs() <= product_tolerance),
        products >= -product_tolerance,
    ).all(dim=1)
    if not bool(optimal.any(dim=0).all()):
        return None
    first = optimal.to(torch.uint8).argmax(dim=0)
    return offsets[first, :, torch.arange(lower.shape[0])].clamp_min(0.0)


def _solve_gathered(problem: _Problem) -> Tensor:
    """CPU path: only the unsolved rows are kept, and the system of each is gathered to the size
    of its free set, in batches of rows with similar sizes that fit in the cache; rows whose free
    set is large are solved through its complement instead (see :class:`_ComplementSolver`)."""
    m = problem.gramian.shape[0]
    padded_gramian = torch.nn.functional.pad(problem.gramian, (0, 1, 0, 1))
    complement_solver = _ComplementSolver.of(problem)
    result = torch.zeros_like(problem.lower)
    indices = torch.arange(problem.lower.shape[0])
    rows = _Rows(problem)
    for round_ in range(_max_rounds(m)):
        wrong, solved = rows.assess(problem)
        if bool(solved.any()):
            result[indices[solved]] = rows.offsets[solved].clamp_min(0.0)
            if bool(solved.all()):
                return result
            unsolved = ~solved
            indices, wrong = indices[unsolved], wrong[unsolved]
            rows.keep(unsolved)
        first = round_ == 0
        rows.pivot(problem, wrong, first, careful_rows=not first and rows.needs_care(wrong))
        free, rhs, start = rows.free, rows.right_hand_side(), rows.refinement_start()
        regularized, refined = torch.zeros_like(rhs), torch.zeros_like(rhs)
        gathered = torch.ones(free.shape[0], dtype=torch.bool)
        if complement_solver is not None:
            through_complement = complement_solver.is_cheaper(free)
            if bool(through_complement.any()):
                selected = through_complement.nonzero().squeeze(1)
                solutions, failed = complement_solver.solve(
                    free[selected], rhs[selected], start[selected]
                )
                selected = selected[~failed]
                # Exact solutions of a positive definite G also serve as the ridged ones.
                regularized[selected] = refined[selected] = solutions[~failed]
                gathered[selected] = False
        if not bool(gathered.any()):
            regularized = refined  # set_offsets then computes the products once
        else:
            regularized[gathered], refined[gathered] = _gathered_free_solve(
                padded_gramian, problem.ridge, free[gathered], rhs[gathered], start[gathered]
            )
        rows.set_offsets(problem, regularized, refined)
    raise _not_converged(m)


class _ComplementSolver:
    """Solves the systems of rows whose free set ``F`` is large through the inverse ``H = G⁻¹``,
    computed once: with ``A`` the complement of ``F``, the Schur complement identity
    ``(G_FF)⁻¹ = H_FF − H_FA H_AA⁻¹ H_AF`` gives ``x = H (r − y)``, where ``y`` (zero off ``A``:
    the multipliers of the problem, up to sign) solves ``H_AA y_A = (H r)_A``. Each row then costs
    a ``|A| x |A|`` factorisation and two products with ``H``, instead of a ``|F| x |F|``
    factorisation: on the Gramians of real IWRM steps most constraints are inactive (``|F|`` about
    90% of ``m``), and the gathered systems would cost ``m³/3`` per row.

    Only used when ``G`` is well-conditioned enough for ``H`` to be accurate (refinement against
    ``G`` then removes the remaining errors); UPGrad's default ``reg_eps`` ensures it. No ridge is
    needed then: the exact problem is itself one whose pivoting terminates (a positive definite
    ``G``), so the exact solutions also serve as the ridged ones that drive the pivoting."""

    # Largest condition number (estimated by trace(G) trace(H), an upper bound) accepted.
    _MAX_CONDITION = 1e8

    def __init__(self, problem: _Problem, inverse: Tensor) -> None:
        self.gramian = problem.gramian
        self.inverse = inverse
        # The padding index m selects a zero row and column of H.
        self.padded_inverse = torch.nn.functional.pad(inverse, (0, 1, 0, 1))
        self.root_diagonal = problem.root_diagonal

    @classmethod
    def of(cls, problem: _Problem) -> _ComplementSolver | None:
        """The solver of ``problem``, or ``None`` if ``G`` is not positive definite enough."""
        solver, usable = cls.unchecked(problem)
        return solver if bool(usable) else None

    @classmethod
    def unchecked(cls, problem: _Problem) -> tuple[_ComplementSolver, Tensor]:
        """The solver of ``problem`` and, on its device, whether ``G`` is positive definite
        enough for it to be used (no host read: the solver is garbage where it is not)."""
        gramian = problem.gramian
        factor, info = torch.linalg.cholesky_ex(gramian)
        # A failed factor may be singular (an error of the inverse on the CPU): use the identity.
        identity = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        factor = torch.where(info == 0, factor, identity)
        inverse = torch.cholesky_inverse(factor)
        condition = inverse.diagonal().sum() * gramian.diagonal().sum()
        usable = (info == 0) & torch.isfinite(condition) & (condition <= cls._MAX_CONDITION)
        return cls(problem, inverse), usable

    def is_cheaper(self, free: Tensor) -> Tensor:
        """Per row, whether the complement costs fewer operations than the gathered system."""
        m = free.shape[1]
        free_sizes = free.sum(dim=1).to(torch.float64)
        complement_sizes = m - free_sizes
        gathered_cost = free_sizes**3 / 3 + 6 * free_sizes**2
        complement_cost = complement_sizes**3 / 3 + 6 * m**2
        return complement_cost < gathered_cost

    def solve(self, free: Tensor, rhs: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
        """Solve ``G_FF x_F = r_F`` (``x = 0`` off ``F``) for every row of ``free``, from ``start``
        where it is not NaN; also return, per row, whether that failed (a factorisation or a
        non-finite result: the caller then gathers the system)."""
        solutions = torch.empty_like(rhs)
        failed = torch.empty(rhs.shape[0], dtype=torch.bool)
        for chunk, size in _chunks_by_size((~free).sum(dim=1)):
            solutions[chunk], failed[chunk] = self._solve_chunk(
                free[chunk], rhs[chunk], start[chunk], size
            )
        return solutions, failed

    def _solve_chunk(
        self, free: Tensor, rhs: Tensor, start: Tensor, size: int, sync_free: bool = False
    ) -> tuple[Tensor, Tensor]:
        """:meth:`solve` for rows whose complements have at most ``size`` indices, with systems
        of that size; ``sync_free`` (the masked path) refines without host reads."""
        m = free.shape[1]
        complement = ~free
        # The indices of A first (the stable sort keeps them increasing), then the padding index.
        indices = torch.sort(complement.to(torch.uint8), dim=1, descending=True, stable=True)[1]
        positions = torch.arange(size, device=free.device)
        valid = positions < complement.sum(dim=1, keepdim=True)
        indices = torch.where(valid, indices[:, :size], m)
        systems = _principal_submatrices(self.padded_inverse, indices, valid)
        factor, info = torch.linalg.cholesky_ex(systems)
        inverse = self.inverse
        mask = free.to(rhs.dtype)

        def solve(right_hand_side: Tensor) -> Tensor:
            products = torch.nn.functional.pad(right_hand_side @ inverse, (0, 1))
            multipliers = torch.cholesky_solve(products.gather(1, indices).unsqueeze(2), factor)
            spread = torch.zeros_like(products).scatter_(1, indices, multipliers.squeeze(2))
            return ((right_hand_side - spread[:, :m]) @ inverse) * mask

        gramian = self.gramian
        solution = torch.where(start.isnan().any(dim=1, keepdim=True), solve(rhs), start)
        solution = _refine(
            lambda x: rhs - (x @ gramian) * mask,
            solve,
            rhs,
            solution,
            self.root_diagonal,
            not sync_free,
        )
        return solution, (info > 0) | ~torch.isfinite(solution).all(dim=1)


def _chunks_by_size(sizes: Tensor) -> Iterator[tuple[Tensor, int]]:
    """Split the rows into chunks of rows of similar ``sizes`` (their systems' sizes), each with
    at most ``_CHUNK_ELEMENTS`` entries in its systems: yield the indices of each chunk's rows and
    the size of its systems (the largest of its rows)."""
    order = torch.argsort(sizes)
    sorted_sizes = sizes[order].tolist()
    b = len(sorted_sizes)
    first = 0
    while first < b:
        last = first + 1
        while last < b and (last + 1 - first) * sorted_sizes[last] ** 2 <= _CHUNK_ELEMENTS:
            last += 1
        yield order[first:last], sorted_sizes[last - 1]
        first = last


def _gathered_free_solve(
    padded_gramian: Tensor, ridge: float, free: Tensor, rhs: Tensor, start: Tensor
) -> tuple[Tensor, Tensor]:
    """Solve ``(G_FF + δ I) x_F = r_F`` and ``G_FF x_F = r_F`` (``x = 0`` off ``F``) for every
    row, in chunks of rows with similar ``|F|``; see :func:`_refined_solve`."""
    regularized, refined = torch.zeros_like(rhs), torch.zeros_like(rhs)
    for chunk, size in _chunks_by_size(free.sum(dim=1)):
        if size > 0:  # else x = 0
            regularized[chunk], refined[chunk] = _fixed_size_free_solve(
                padded_gramian, ridge, free[chunk], rhs[chunk], start[chunk], size, False
            )
    return regularized, refined


def _principal_submatrices(padded: Tensor, indices: Tensor, valid: Tensor) -> Tensor:
    """The submatrices ``A[I, I]`` of the matrix ``A`` padded with a zero last row and column, for
    the rows ``I`` of ``indices`` (``[b, k]``), where the padding index (entries not ``valid``)
    gives a row and column of the identity."""
    # One flat gather of the k² entries per row: gathering whole rows first would copy k x m.
    size = padded.shape[1]
    systems = torch.take(padded, indices.unsqueeze(2) * size + indices.unsqueeze(1))
    systems.diagonal(dim1=1, dim2=2).add_((~valid).to(systems.dtype))
    return systems


def _refined_solve(
    systems: Tensor, ridge: Tensor, rhs: Tensor, start: Tensor, sync_free: bool = False
) -> tuple[Tensor, Tensor]:
    """Solve ``(systems + diag(ridge)) x = rhs`` with a Cholesky factorisation, and
    ``systems x = rhs`` by iterative refinement with the same factor, from the ridged solution, or
    from ``start`` for the rows where it is not NaN (rows whose free set did not change, so that
    refinement goes on over the rounds). The systems are positive semi-definite; refinement removes
    the ridge's effect on well-conditioned ones and brings the residual to rounding level on
    (consistent) singular ones. ``_REFINEMENTS`` steps are made on accelerators; on the CPU, steps
    are made while the residuals are above rounding level and still decreasing. ``sync_free``
    (the masked path) makes the accelerators' choices on the CPU too.

    :raises ValueError: On the CPU, if a factorisation fails (a clearly indefinite system).
    """
    on_cpu = systems.device.type == "cpu" and not sync_free
    shifted = systems.clone()
    shifted.diagonal(dim1=-2, dim2=-1).add_(ridge)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if on_cpu and bool((info > 0).any()):
        raise ValueError(
            "Parameter `gramian` should be positive semi-definite, but a principal submatrix "
            "of it has a clearly negative eigenvalue."
        )
    regularized = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    refined = torch.where(start.isnan().any(dim=-1, keepdim=True), regularized, start)
    root_diagonal = systems.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()
    refined = _refine(
        lambda x: rhs - (systems @ x.unsqueeze(-1)).squeeze(-1),
        lambda residual: torch.cholesky_solve(residual.unsqueeze(-1), factor).squeeze(-1),
        rhs,
        refined,
        root_diagonal,
        on_cpu,
    )
    return regularized, refined


def _refine(
    residual_of: Callable[[Tensor], Tensor],
    correction_of: Callable[[Tensor], Tensor],
    rhs: Tensor,
    solution: Tensor,
    root_diagonal: Tensor,
    on_cpu: bool,
) -> Tensor:
    """Iterative refinement of the ``solution`` of the systems ``A x = rhs`` (one per row, along
    the last dimension): ``x ← x + C (rhs − A x)``, with ``residual_of(x) = rhs − A x`` and
    ``correction_of`` an approximate inverse of ``A``. ``_REFINEMENTS`` steps on accelerators; on
    the CPU, steps are made while the residuals are above rounding level and still decreasing."""
    if not on_cpu:
        for _ in range(_REFINEMENTS):
            solution = solution + correction_of(residual_of(solution))
        return solution
    # Rounding level of the residuals, per entry: |A_ij| <= s_i s_j with s = sqrt(diag(A)) for a
    # PSD matrix A, so the error of (A x)_i is about ε s_i Σ_j s_j |x_j|.
    rounding = solution.shape[-1] * torch.finfo(solution.dtype).eps
    previous_norm = None
    for _ in range(_MAX_REFINEMENTS):
        residual = residual_of(solution)
        magnitude = root_diagonal * (root_diagonal * solution.abs()).sum(dim=-1, keepdim=True)
        pending = (residual.abs() > rounding * (magnitude + rhs.abs())).any(dim=-1)
        norm = residual.abs().amax(dim=-1)
        if previous_norm is not None:
            pending &= norm < 0.9 * previous_norm
        if not bool(pending.any()):
            break
        previous_norm = norm
        solution = solution + correction_of(residual)
    return solution


def _solve_masked(problem: _Problem) -> Tensor:
    """Device path: shapes depend on the data only through one host read per round.

    Each round pivots every unsolved row, then reads back to the host, in one transfer, whether
    all rows are solved (and that the data are finite and ``G`` positive semi-definite) and, for
    the two kinds of systems, how many rows use them and the largest system: rows whose free set
    is large (``|F| > |A|``, roughly) are solved through the complement ``A`` of ``F`` with
    ``H = G⁻¹`` (see :class:`_ComplementSolver`; only if ``G`` is well-conditioned, which is
    checked on the device and read with the flags of the first round), the others on ``G_FF``;
    each kind with systems of one size, its rows' largest, padded with the identity. That read is
    the only host synchronisation: one per round (two to four per call, as the warm start usually
    leaves one to three rounds). On real IWRM Gramians most indices are free, so the systems are
    about ten times smaller than ``G``, and cost about a thousandth of ``m³``."""
    gramian = problem.gramian
    b, m = problem.lower.shape
    device = gramian.device
    padded_gramian = torch.nn.functional.pad(gramian, (0, 1, 0, 1))
    complement_solver, usable = _ComplementSolver.unchecked(problem)
    rows = _Rows(problem)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    # Rows whose complement system could not be solved: gathered from then on, like on the CPU.
    complement_failed = torch.zeros_like(done)
    gramian_finite = torch.isfinite(gramian).all()
    for round_ in range(_max_rounds(m)):
        wrong, solved = rows.assess(problem)
        done = done | solved
        state = rows.pivot_state()
        rows.pivot(problem, wrong, first=round_ == 0, careful_rows=True, sync_free=True)
        rows.restore(done, state)
        free = rows.free
        free_sizes = free.sum(dim=1)
        through_complement = ~done & usable & ~complement_failed
        through_complement &= complement_solver.is_cheaper(free)
        gathered = ~done & ~through_complement
        flags = torch.stack(
            [
                done.all(),
                torch.isfinite(rows.offsets).all() & gramian_finite,
                problem.indefinite,
                through_complement.sum(),
                torch.where(through_complement, m - free_sizes, 0).amax(),
                gathered.sum(),
                torch.where(gathered, free_sizes, 0).amax(),
            ]
        )
        all_done, finite, indefinite, complement_rows, complement_size, gathered_rows, size = (
            flags.to(torch.long).tolist()
        )
        if not finite:
            raise ValueError("Parameters `gramian` and `weights` should have finite entries.")
        if indefinite:
            raise _IndefiniteGramianError
        if all_done:
            return rows.offsets.clamp_min(0.0)
        rhs, start = rows.right_hand_side(), rows.refinement_start()
        regularized, refined = rows.regularized_offsets.clone(), rows.offsets.clone()
        failed = torch.zeros_like(done)
        for chunk in _masked_chunks(through_complement, complement_rows, complement_size, m):
            solution, chunk_failed = complement_solver._solve_chunk(
                free[chunk], rhs[chunk], start[chunk], complement_size, sync_free=True
            )
            # A failed row keeps its solution, and its pivoting is undone below.
            solution = torch.where(chunk_failed.unsqueeze(1), refined[chunk], solution)
            # Exact solutions of a positive definite G also serve as the ridged ones.
            regularized[chunk] = torch.where(
                chunk_failed.unsqueeze(1), regularized[chunk], solution
            )
            refined[chunk] = solution
            failed[chunk] = chunk_failed
        for chunk in _masked_chunks(gathered, gathered_rows, size, m):
            if size == 0:
                regularized[chunk] = refined[chunk] = 0.0
            else:
                regularized[chunk], refined[chunk] = _fixed_size_free_solve(
                    padded_gramian, problem.ridge, free[chunk], rhs[chunk], start[chunk], size
                )
        complement_failed |= failed
        rows.restore(failed, state)
        rows.set_offsets(problem, regularized, refined)
    wrong, solved = rows.assess(problem)
    if bool((done | solved).all()):
        return rows.offsets.clamp_min(0.0)
    raise _not_converged(m)


def _masked_chunks(selected: Tensor, count: int, size: int, m: int) -> Iterator[Tensor]:
    """The indices of the ``count`` rows of the mask ``selected`` (counted on the host), in chunks
    of at most ``_MASKED_CHUNK_ELEMENTS`` entries in their ``size x size`` systems, or in their
    vectors of length ``m``."""
    if count == 0:
        return
    # The stable sort puts the selected rows first, without a host read.
    indices = torch.sort((~selected).to(torch.uint8), stable=True)[1][:count]
    rows_per_chunk = max(1, _MASKED_CHUNK_ELEMENTS // max(size * size, m + 1))
    yield from indices.split(rows_per_chunk)


def _fixed_size_free_solve(
    padded_gramian: Tensor,
    ridge: float,
    free: Tensor,
    rhs: Tensor,
    start: Tensor,
    size: int,
    sync_free: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`_refined_solve` (without host reads if ``sync_free``) on the systems ``G_FF`` of
    the rows (``|F| ≤ size``) gathered to ``size x size`` and padded with the identity."""
    b, m = free.shape
    # Free indices first (the stable sort keeps them increasing), then the padding index m.
    indices = torch.sort(free.to(torch.uint8), dim=1, descending=True, stable=True)[1]
    valid = torch.arange(size, device=free.device) < free.sum(dim=1, keepdim=True)
    indices = torch.where(valid, indices[:, :size], m)
    systems = _principal_submatrices(padded_gramian, indices, valid)
    x_regularized, x_refined = _refined_solve(
        systems,
        ridge * valid.to(systems.dtype),
        torch.nn.functional.pad(rhs, (0, 1)).gather(1, indices),
        torch.nn.functional.pad(start, (0, 1)).gather(1, indices),
        sync_free=sync_free,
    )
    zeros = rhs.new_zeros(b, m + 1)
    return (
        zeros.scatter(1, indices, x_regularized)[:, :m],
        zeros.scatter(1, indices, x_refined)[:, :m],
    )


def _max_rounds(m: int) -> int:
    return 4 * m + 50


def _not_converged(m: int) -> RuntimeError:
    return RuntimeError(
        f"The dual-cone solver did not converge in {_max_rounds(m)} rounds. This should not happen "
        "for a positive semi-definite Gramian; please report it, and use `solver='quadprog'` "
        "meanwhile."
    )


def check_epsilon(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite non-negative number, else raise a
    ``ValueError`` naming the parameter ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ValueError(
            f"Parameter `{name}` should be a non-negative number. Found `{name} = {value!r}`."
        )
    if not math.isfinite(value):
        raise ValueError(f"Parameter `{name}` should be finite. Found `{name} = {value!r}`.")
    return value
