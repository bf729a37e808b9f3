r"""Exact, batched projections onto the dual cone of the rows of a matrix, from their Gramian.

For a Gramian ``G = J Jᵀ`` (``m x m``) and a vector ``u`` of length ``m``, the quadratic program

.. math::

    \min_v \; v^\top G v \quad \text{subject to} \quad v \geq u \text{ (entry-wise)}

has a minimiser ``v`` such that ``Jᵀv`` is the projection of ``Jᵀu`` onto the dual cone
``{x : J x ≥ 0}`` (Proposition 1 of the Jacobian descent paper). UPGrad solves it for every
``u = u_i e_i``, DualProj for one ``u``.

Method. With ``x = v − u`` and ``y = G v = G x + G u`` (half the Lagrange multipliers), the
optimality conditions are the linear complementarity problem ``x ≥ 0, y ≥ 0, x ⊙ y = 0``. It is
solved by block principal pivoting (Júdice and Pires, 1994; Kim and Park, 2011): guess a free set
``F`` (the indices where ``x`` may be positive), solve ``G_FF x_F = −(G u)_F`` with ``x = 0`` off
``F``, then move every index where ``x`` or ``y`` is negative to the other side. When a full
exchange has not reduced the number of such indices for a few rounds, only the largest one moves
(Murty's rule), which makes the method finite for a positive definite ``G``. A round where nothing
moves proves that ``x`` is the minimiser: the KKT conditions hold up to rounding errors, which is
what the convergence test checks. All the problems share ``G`` and are solved together, each
keeping its own free set.

Numerics. The solver works in float64, on ``G`` divided by its trace (the minimiser does not depend
on the scale of ``G``). The linear systems are factorised with a ridge of ``64 ε`` (relative to the
trace) on the diagonal and then refined against the exact system, so that a singular ``G`` (a
rank-deficient Jacobian with ``reg_eps=0``) still gets a minimiser, and a positive definite one gets
the exact solution. On the CPU, the rows still in progress are gathered into systems of the size of
their free sets, and the loop stops as soon as all rows are done; on other devices, all rows keep
full-size masked systems (no data-dependent shapes) and one boolean is read back to the host every
few rounds to know whether to stop: the only host synchronisation of the solver.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

SolverName = Literal["active_set", "quadprog"]
SOLVERS: tuple[SolverName, ...] = get_args(SolverName)

# The linear systems are factorised with this many machine epsilons (relative to the trace of the
# Gramian) added to their diagonal, so that a singular Gramian still gets a factorisation.
_RIDGE = 64.0
# Sign tests accept errors of up to this many times `m * ε` times the natural scale.
_TOLERANCE = 4.0
# Rounds of full exchange allowed without progress before switching to single exchanges.
_PATIENCE = 3
# Most elements in one batch of gathered systems (CPU): 4 MiB in float64, about the L2 cache size.
_CHUNK_ELEMENTS = 2**19
# Most elements in one batch of full-size masked systems (other devices): 256 MiB in float64.
_MASKED_CHUNK_ELEMENTS = 2**25
# Iterations and over-relaxation of the ADMM that guesses the first free sets.
_WARM_START_ITERATIONS = 20
_RELAXATION = 1.6
# Rounds of the masked solver between two host reads of the convergence flag.
_ROUNDS_PER_CHECK = 8


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

    :param weights: The vectors ``u``, of shape ``[..., m]``.
    :param gramian: The ``m x m`` positive semi-definite matrix ``G``.
    :raises ValueError: If the shapes do not match, if ``G`` or ``u`` has non-finite entries
        (checked on the CPU only), or if ``G`` is not positive semi-definite (found when a
        factorisation fails, on the CPU).
    """
    _check_shapes(weights, gramian)
    m = gramian.shape[0]
    if weights.numel() == 0:
        return weights.detach().clone()
    with torch.no_grad():
        work = torch.float64
        lower = weights.detach().reshape(-1, m).to(work)
        g = gramian.detach().to(work)
        on_cpu = g.device.type == "cpu"
        if on_cpu:
            _check_finite(lower, g)
        trace = g.diagonal().sum()
        g = g / torch.where(trace > 0, trace, torch.ones_like(trace))
        problem = _Problem(g, lower)
        offsets = _solve_gathered(problem) if on_cpu else _solve_masked(problem)
        return (lower + offsets).reshape(weights.shape).to(weights.dtype)


def _check_shapes(weights: Tensor, gramian: Tensor) -> None:
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"Parameter `gramian` should be a square matrix. Found `gramian.shape = "
            f"{gramian.shape}`."
        )
    if weights.ndim == 0 or weights.shape[-1] != gramian.shape[0]:
        raise ValueError(
            "Parameter `weights` should have a last dimension of the size of `gramian`. Found "
            f"`weights.shape = {weights.shape}` and `gramian.shape = {gramian.shape}`."
        )


def _check_finite(lower: Tensor, gramian: Tensor) -> None:
    if not bool(torch.isfinite(gramian).all()):
        raise ValueError("Parameter `gramian` should have finite entries only.")
    if not bool(torch.isfinite(lower).all()):
        raise ValueError("Parameter `weights` should have finite entries only.")


class _Problem:
    """The data shared by all the rounds: ``G`` (trace-normalised), the lower bounds ``U`` (one
    problem per row), ``Q = U G`` and the scales of the convergence tests."""

    def __init__(self, gramian: Tensor, lower: Tensor) -> None:
        m = gramian.shape[0]
        eps = torch.finfo(gramian.dtype).eps
        self.gramian = gramian
        self.lower = lower
        self.linear = lower @ gramian
        self.ridge = _RIDGE * eps
        # |G_ij| <= s_i s_j: the error of an entry of G x is at most about m ε s_i Σ_j s_j |x_j|.
        self.root_diagonal = gramian.diagonal().clamp_min(0.0).sqrt()
        self.floored_root_diagonal = self.root_diagonal.clamp_min(math.sqrt(self.ridge))
        self.unit_error = _TOLERANCE * max(m, 1) * eps

    def rounding_scale(self, offsets: Tensor, lower: Tensor) -> Tensor:
        """Per row, the size of the rounding errors of ``G v`` divided by ``s_i``."""
        return self.unit_error * ((offsets.abs() + lower.abs()) @ self.root_diagonal)


def _infeasibilities(
    problem: _Problem, offsets: Tensor, products: Tensor, free: Tensor, lower: Tensor
) -> tuple[Tensor, Tensor]:
    """Return the mask of the indices on the wrong side (``x < 0`` in ``F`` or ``y < 0`` off
    ``F``), and, per row, whether the row is solved (no such index, and ``y_F = 0``)."""
    scale = problem.rounding_scale(offsets, lower).unsqueeze(1)
    product_tolerance = scale * problem.root_diagonal
    offset_tolerance = scale / problem.floored_root_diagonal
    wrong = torch.where(free, offsets < -offset_tolerance, products < -product_tolerance)
    unbalanced = free & (products.abs() > product_tolerance)
    solved = ~(wrong | unbalanced).any(dim=1)
    return wrong, solved


def _exchange(
    free: Tensor, wrong: Tensor, best: Tensor, patience: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One block principal pivoting step (Júdice and Pires): flip all the wrong indices while their
    number decreases or the patience lasts, else only the last wrong index."""
    count = wrong.sum(dim=1)
    improved = count < best
    full = improved | (patience > 0)
    best = torch.where(improved, count, best)
    patience = torch.where(improved, _PATIENCE, torch.where(full, patience - 1, patience))
    m = wrong.shape[1]
    positions = torch.arange(m, device=wrong.device)
    last = torch.where(wrong, positions, -1).amax(dim=1, keepdim=True)
    single = positions == last
    flips = torch.where(full.unsqueeze(1), wrong, single & wrong)
    return free ^ flips, best, patience


def _warm_start(problem: _Problem, lower: Tensor) -> Tensor:
    """Guess the free sets of the rows of ``lower`` from a few iterations of over-relaxed ADMM
    (the splitting of OSQP) on all of them at once: each iteration is one product with the
    precomputed ``ρ (2G + ρI)⁻¹``, so the guess costs a few matrix products and saves most of the
    rounds of pivoting. ``ρ`` is the geometric mean of the eigenvalues of ``2G`` (from the
    determinant), which balances the primal and dual progress on ill-conditioned Gramians."""
    gramian = problem.gramian
    m = gramian.shape[0]
    identity = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    factor, info = torch.linalg.cholesky_ex(gramian + problem.ridge * identity)
    geometric_mean = torch.exp(2.0 * factor.diagonal().log().mean())
    fallback = gramian.diagonal().mean().clamp_min(problem.ridge)
    usable = (info == 0) & torch.isfinite(geometric_mean) & (geometric_mean > 0)
    rho = 2.0 * torch.where(usable, geometric_mean, fallback)
    system_factor = torch.linalg.cholesky_ex(2.0 * gramian + rho * identity)[0]
    step = torch.cholesky_inverse(system_factor) * rho
    z = lower
    w = torch.zeros_like(lower)
    for _ in range(_WARM_START_ITERATIONS):
        v = _RELAXATION * ((z - w) @ step) + (1.0 - _RELAXATION) * z
        z_next = torch.maximum(lower, v + w)
        w = w + v - z_next
        z = z_next
    return z > lower


def _solve_gathered(problem: _Problem) -> Tensor:
    """CPU path: see :class:`_GatheredSolver`."""
    return _GatheredSolver(problem).run()


class _GatheredSolver:
    """CPU path of the solver. Only the rows still in progress are kept, and the system of each is
    gathered to the size of its free set, in batches of rows with similar sizes that fit in the
    cache."""

    def __init__(self, problem: _Problem) -> None:
        self.problem = problem
        b, m = problem.lower.shape
        self.m = m
        self.padded_gramian = torch.zeros(m + 1, m + 1, dtype=problem.gramian.dtype)
        self.padded_gramian[:m, :m] = problem.gramian
        self.result = torch.zeros_like(problem.lower)
        self.rows = torch.arange(b)
        self.lower = problem.lower
        self.linear = problem.linear
        self.offsets = torch.zeros_like(problem.lower)
        self.products = problem.linear.clone()
        self.free = torch.zeros(b, m, dtype=torch.bool)
        self.best = torch.full((b,), m + 1, dtype=torch.long)
        self.patience = torch.full((b,), _PATIENCE, dtype=torch.long)

    def run(self) -> Tensor:
        for round_ in range(_max_rounds(self.m)):
            wrong, solved = _infeasibilities(
                self.problem, self.offsets, self.products, self.free, self.lower
            )
            if bool(solved.any()):
                self.result[self.rows[solved]] = self.offsets[solved].clamp_min(0.0)
                if bool(solved.all()):
                    return self.result
                wrong = self._retire(solved, wrong)
            # A row with nothing to move only needs more refinement, from where it is.
            refine_only = ~wrong.any(dim=1)
            if round_ == 0:
                self.free = _warm_start(self.problem, self.lower)
            else:
                self.free, self.best, self.patience = _exchange(
                    self.free, wrong, self.best, self.patience
                )
            self._solve(refine_only)
        raise _not_converged(self.m)

    def _retire(self, solved: Tensor, wrong: Tensor) -> Tensor:
        keep = ~solved
        self.rows, self.lower, self.linear = self.rows[keep], self.lower[keep], self.linear[keep]
        self.offsets, self.products = self.offsets[keep], self.products[keep]
        self.free, self.best, self.patience = self.free[keep], self.best[keep], self.patience[keep]
        return wrong[keep]

    def _solve(self, refine_only: Tensor) -> None:
        """Set ``offsets`` to the solution of ``G_FF x_F = −(G u)_F`` (``x = 0`` off ``F``) and
        ``products`` to ``G v``, for every row. The rows in ``refine_only`` (whose ``F`` did not
        change) take one step of iterative refinement from their current offsets instead, with
        an exact residual: that removes the ridge's effect on nearly singular systems."""
        m = self.m
        keep = refine_only.unsqueeze(1)
        residual = torch.where(keep, -self.products, -self.linear) * self.free
        residual = torch.nn.functional.pad(residual, (0, 1))
        correction = torch.zeros_like(residual)
        counts = self.free.sum(dim=1)
        order = torch.argsort(counts)
        sorted_counts = counts[order].tolist()
        n = len(sorted_counts)
        first = 0
        while first < n and sorted_counts[first] == 0:
            first += 1
        while first < n:
            last = first + 1
            while last < n and (last + 1 - first) * sorted_counts[last] ** 2 <= _CHUNK_ELEMENTS:
                last += 1
            chunk = order[first:last]
            size = sorted_counts[last - 1]
            # Free indices first (the stable sort keeps them increasing), then the padding index.
            indices = torch.sort(
                self.free[chunk].to(torch.uint8), dim=1, descending=True, stable=True
            )[1][:, :size]
            valid = torch.arange(size) < counts[chunk].unsqueeze(1)
            indices = torch.where(valid, indices, m)
            flat_indices = indices.unsqueeze(2) * (m + 1) + indices.unsqueeze(1)
            systems = torch.take(self.padded_gramian, flat_indices)
            # The padding rows and columns become the identity.
            systems.diagonal(dim1=1, dim2=2).add_((~valid).to(systems.dtype))
            factor = _cholesky(systems, ridge=self.problem.ridge * valid.to(systems.dtype))
            x = torch.cholesky_solve(residual[chunk].gather(1, indices).unsqueeze(-1), factor)
            correction[chunk] = torch.zeros_like(residual[chunk]).scatter_(1, indices, x[..., 0])
            first = last
        self.offsets = torch.where(keep, self.offsets, 0.0) + correction[:, :m]
        self.products = self.offsets @ self.problem.gramian + self.linear


def _cholesky(matrices: Tensor, ridge: Tensor | None = None) -> Tensor:
    """Cholesky factors of a batch of positive semi-definite matrices. On the CPU, the matrices
    that are numerically singular are factorised again with ``ridge`` added to their diagonal,
    and a ``ValueError`` is raised for those that still fail."""
    factor, info = torch.linalg.cholesky_ex(matrices)
    if matrices.device.type != "cpu":
        return factor
    failed = info > 0
    if ridge is not None and bool(failed.any()):
        retry = torch.nonzero(failed).squeeze(1)
        ridged = matrices[retry] + torch.diag_embed(ridge[retry])
        factor[retry], info[retry] = torch.linalg.cholesky_ex(ridged)
        failed = info > 0
    if bool(failed.any()):
        raise ValueError(
            "Parameter `gramian` should be positive semi-definite, but a principal submatrix "
            "of it has a clearly negative eigenvalue."
        )
    return factor


def _refined_solve(
    shifted: Tensor, shift: Tensor, factor: Tensor, rhs: Tensor, start: Tensor
) -> Tensor:
    """Solve ``(shifted − diag(shift)) x = rhs`` by two steps of iterative refinement from
    ``start``, with the Cholesky ``factor`` of ``shifted`` (positive definite thanks to the small
    ``shift``). The second step removes the effect of ``shift`` when the exact system is positive
    definite; starting from the previous round's solution lets a row whose free set did not change
    keep refining, should two steps not suffice (nearly singular systems)."""
    x = start.unsqueeze(-1)
    for _ in range(2):
        residual = rhs.unsqueeze(-1) - shifted @ x + shift.unsqueeze(-1) * x
        x = x + torch.cholesky_solve(residual, factor)
    return x.squeeze(-1)


def _solve_masked(problem: _Problem) -> Tensor:
    """Device path: every row keeps a full-size system, masked to its free set, so that shapes
    never depend on the data; solved rows are frozen. The convergence flag is read back to the
    host every ``_ROUNDS_PER_CHECK`` rounds."""
    lower, linear, gramian = problem.lower, problem.linear, problem.gramian
    b, m = lower.shape
    device = lower.device
    offsets = torch.zeros_like(lower)
    products = linear.clone()
    free = torch.zeros_like(lower, dtype=torch.bool)
    best = torch.full((b,), m + 1, dtype=torch.long, device=device)
    patience = torch.full((b,), _PATIENCE, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    rows_per_chunk = max(1, _MASKED_CHUNK_ELEMENTS // (m * m))
    for round_ in range(_max_rounds(m)):
        wrong, solved = _infeasibilities(problem, offsets, products, free, lower)
        done = done | solved
        if round_ % _ROUNDS_PER_CHECK == 0:
            all_done, finite = torch.stack([done.all(), torch.isfinite(offsets).all()]).tolist()
            if all_done:
                return offsets.clamp_min(0.0)
            if not finite:
                raise ValueError(
                    "Parameter `gramian` should be positive semi-definite with finite entries."
                )
        if round_ == 0:
            new_free, new_best, new_patience = _warm_start(problem, lower), best, patience
        else:
            new_free, new_best, new_patience = _exchange(free, wrong, best, patience)
        keep = done.unsqueeze(1)
        free = torch.where(keep, free, new_free)
        best = torch.where(done, best, new_best)
        patience = torch.where(done, patience, new_patience)
        new_offsets = torch.cat(
            [
                _masked_free_solve(
                    gramian,
                    problem.ridge,
                    free[first : first + rows_per_chunk],
                    -linear[first : first + rows_per_chunk],
                    (offsets * free)[first : first + rows_per_chunk],
                )
                for first in range(0, b, rows_per_chunk)
            ]
        )
        offsets = torch.where(keep, offsets, new_offsets)
        products = offsets @ gramian + linear
    raise _not_converged(m)


def _masked_free_solve(
    gramian: Tensor, ridge: float, free: Tensor, rhs: Tensor, start: Tensor
) -> Tensor:
    """Solve ``G_FF x_F = rhs_F`` (``x = 0`` off ``F``) with ``m x m`` systems equal to ``G`` on
    ``F x F`` and to the identity elsewhere."""
    both = free.unsqueeze(2) & free.unsqueeze(1)
    systems = torch.where(both, gramian, 0.0)
    systems.diagonal(dim1=1, dim2=2).add_(torch.where(free, ridge, 1.0).to(systems.dtype))
    shift = torch.where(free, ridge, 0.0).to(systems.dtype)
    return _refined_solve(systems, shift, _cholesky(systems), rhs * free, start)


def _max_rounds(m: int) -> int:
    return 3 * m + 30


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
