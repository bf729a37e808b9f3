r"""Exact solver of the convex subproblem that Nash-MTL iterates.

Given the normalised Gramian ``Ĝ`` (``n x n``, positive semi-definite), ``ε = 1 / nf`` (``nf`` the
Frobenius norm of the original Gramian) and the previous iterate ``α_p > 0``, the subproblem is

    minimise    kᵀα
    subject to  α_i (Ĝα)_i ≥ ε   and   α_i > 0   for every i,

with ``k = Ĝ1 + ε (1/α_p + Ĝ (1/(Ĝα_p)))``: the linearisation used by Nash-MTL (Navon et al.,
2022), written with products instead of its equivalent logarithmic constraints
``log(α_i nf) + log((Ĝα)_i) ≥ 0``. Each constraint is a rotated second-order cone (a hyperbola
``α_i y_i ≥ ε`` with ``y = Ĝα`` linear), so the feasible set is convex, and
``-log(α_i (Ĝα)_i - ε)`` is a self-concordant barrier of it.

Facts used below:

* The problem is feasible exactly when some ``α > 0`` has ``Ĝα > 0``, i.e. when the origin is not
  in the convex hull of the gradients (the minimum-norm point of the hull then gives such an
  ``α``).
* Scaling a feasible point up keeps it feasible. So if some feasible point has ``kᵀα < 0`` the
  problem is unbounded, and otherwise its value is non-negative.
* When every constraint is active, the solution is the unique ``α > 0`` with ``α ⊙ Ĝα = ε 1``
  (Nash-MTL's bargaining solution), the minimiser of ``½αᵀĜα - ε Σ log α_i``. It is optimal
  exactly when ``k`` is a non-negative combination of the constraints' gradients there, a
  certificate we check; this is the usual case, and it is solved to machine precision by Newton's
  method. Otherwise a barrier method solves the problem to a duality gap of ``1e-13`` relative,
  and Newton's method on the optimality conditions, with the constraints that the barrier left
  nearly active as equalities, makes them hold to rounding errors (a constraint with a tiny
  multiplier can keep a slack of ``1e-6`` at that gap); the polished point is kept only when it
  is certified: feasible, non-negative multipliers, stationary, no worse.

All of this runs on the CPU in float64 (the problem has one variable per task).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._simplex_qp import minimize_over_simplex

# Relative duality gap at which the barrier method stops.
_GAP_RTOL = 1e-13
# Factor by which the weight of the objective grows between two centring steps.
_T_FACTOR = 16.0
# Constraints whose slack the barrier method left below this are taken as active by the polish.
_ACTIVE_SLACK = 1e-4
# Violations of the constraints (relative: their right-hand side is 1) that the polish takes for
# rounding errors and removes by scaling; the result is kept only if it is then no worse than the
# barrier's point.
_SCALED_VIOLATION = 1e-9


def solve_nash_mtl_subproblem(gramian: Tensor, epsilon: float, previous: Tensor) -> Tensor | None:
    """Solve the subproblem, or return ``None`` if it is infeasible, unbounded or ill-posed (the
    cases in which the original solver reports no solution).

    :param gramian: The normalised Gramian ``Ĝ`` (float64, CPU).
    :param epsilon: ``ε = 1 / nf``, positive.
    :param previous: The previous iterate ``α_p`` (float64, CPU).
    """

    # In the variable β = α / √ε, the constraints read β_i (Ĝβ)_i ≥ 1.
    root_epsilon = math.sqrt(epsilon)
    with torch.no_grad():
        cost = gramian.sum(dim=1) + epsilon * (
            1.0 / previous + gramian @ (1.0 / (gramian @ previous))
        )
        if not bool(torch.isfinite(cost).all()) or not bool(torch.isfinite(gramian).all()):
            return None
        start = _strictly_feasible_point(gramian, previous / root_epsilon)
        if start is None:
            return None
        if float(cost @ start) < 0.0:
            return None
        solution = _bargaining_point_if_optimal(gramian, cost, start)
        if solution is None:
            solution = _barrier_method(gramian, cost, start)
            if solution is not None:
                solution = _polished(gramian, cost, solution)
        return None if solution is None else solution * root_epsilon


def _constraints(gramian: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    products = gramian @ beta
    return products, beta * products - 1.0


def _is_strictly_feasible(gramian: Tensor, beta: Tensor) -> bool:
    products, slacks = _constraints(gramian, beta)
    return bool((beta > 0).all() and (products > 0).all() and (slacks > 0).all())


def _strictly_feasible_point(gramian: Tensor, hint: Tensor) -> Tensor | None:
    """A point with ``β_i (Ĝβ)_i ≥ 2``: the hint scaled up if it has ``β > 0, Ĝβ > 0``, else one
    built from the minimum-norm point of the hull of the gradients; ``None`` if there is none."""

    n = gramian.shape[0]
    candidates = [hint]
    solution = minimize_over_simplex(gramian)
    squared_norm = float(solution.weights @ gramian @ solution.weights)
    scale = float(gramian.diagonal().max()) if n > 0 else 0.0
    if squared_norm <= 1e-14 * scale:
        # The origin is (numerically) in the hull of the gradients: infeasible.
        return None
    # Every (Ĝw)_i is at least ‖x‖² at the minimum-norm point; mixing in a little of the
    # barycentre makes all weights positive while keeping (Ĝβ)_i ≥ ‖x‖² / 2.
    barycentre_products = gramian.sum(dim=1).abs().max() / n
    mixing = min(1.0, 0.5 * squared_norm / max(float(barycentre_products), 1e-300))
    candidates.append(solution.weights + mixing / n)
    for candidate in candidates:
        products = gramian @ candidate
        if bool((candidate > 0).all() and (products > 0).all()):
            smallest = float((candidate * products).min())
            return candidate * math.sqrt(2.0 / smallest)
    return None


def _bargaining_point_if_optimal(gramian: Tensor, cost: Tensor, start: Tensor) -> Tensor | None:
    """The solution of ``β ⊙ Ĝβ = 1`` if it exists and is optimal (non-negative multipliers),
    else ``None``."""

    beta = start / math.sqrt(2.0)
    # Damped Newton's method on the self-concordant ½βᵀĜβ - Σ log β_i (whose minimiser is the
    # solution), until quadratic convergence reaches the rounding errors.
    previous_decrement = math.inf
    for _ in range(100):
        gradient = gramian @ beta - 1.0 / beta
        hessian = gramian + torch.diag(1.0 / beta**2)
        step = -_solve_psd(hessian, gradient)
        decrement = float(-(gradient @ step))
        if not math.isfinite(decrement):
            return None
        pure_newton = decrement < 0.0625
        if decrement <= 0.0 or (pure_newton and decrement > 0.5 * previous_decrement):
            break
        size = 1.0 if pure_newton else 1.0 / (1.0 + math.sqrt(decrement))
        for _ in range(60):
            if bool((beta + size * step > 0).all()):
                break
            size /= 2.0
        beta = beta + size * step
        if pure_newton:
            previous_decrement = decrement
            if decrement <= 1e-20:
                break
    # Whether the solution was reached (to rounding) is decided by the constraints themselves.
    products, slacks = _constraints(gramian, beta)
    if not bool((products > 0).all()) or float(slacks.abs().max()) > 1e-12:
        return None
    # Optimality: cost = Σ μ_i ∇(β_i (Ĝβ)_i) with μ ≥ 0, the gradients being the rows of
    # diag(Ĝβ) + diag(β) Ĝ.
    jacobian = torch.diag(products) + beta.unsqueeze(1) * gramian
    try:
        multipliers = torch.linalg.solve(jacobian.T, cost)
    except RuntimeError:
        return None
    residual = float((jacobian.T @ multipliers - cost).abs().max())
    if residual > 1e-10 * float(cost.abs().max()) or float(multipliers.min()) < 0.0:
        return None
    return beta


def _barrier_method(gramian: Tensor, cost: Tensor, start: Tensor) -> Tensor | None:
    """Minimise ``kᵀβ`` subject to ``β_i (Ĝβ)_i ≥ 1`` from the strictly feasible ``start``, by
    the barrier method; ``None`` if the problem turns out unbounded, or if rounding errors stop
    the method before its duality gap is below ``1e-8`` relative (this happens when the previous
    iterate is so large that the entries of ``kᵀβ`` cancel out)."""

    n = gramian.shape[0]
    barrier_parameter = 2.0 * n  # Each rotated cone contributes 2.
    beta = start
    value = float(cost @ beta)
    t = barrier_parameter / max(value, 1e-12 * float(cost.abs().max()) * float(beta.abs().max()))
    for _ in range(60):
        centred, status = _centre(gramian, cost, beta, t)
        if status == "unbounded":
            return None
        if status == "stalled":
            # The last centred point is optimal up to the gap of its `t`, the previous one.
            previous_gap = barrier_parameter / (t / _T_FACTOR)
            return beta if previous_gap <= 1e-8 * abs(value) else None
        beta = centred
        value = float(cost @ beta)
        if barrier_parameter / t <= _GAP_RTOL * abs(value):
            break
        t *= _T_FACTOR
    return beta


def _polished(gramian: Tensor, cost: Tensor, beta: Tensor) -> Tensor:
    """``beta`` (a solution of the barrier method) moved onto the constraints it left nearly
    active, by Newton's method on the optimality conditions ``β_i (Ĝβ)_i = 1`` (``i`` in the
    active set ``A``) and ``k = Σ_A μ_i ∇(β_i (Ĝβ)_i)``; ``beta`` itself when the result cannot
    be certified (infeasible, a negative multiplier, not stationary, or a worse objective)."""

    n = gramian.shape[0]
    active = (_constraints(gramian, beta)[1] <= _ACTIVE_SLACK).nonzero().squeeze(1)
    if active.numel() == 0:
        return beta

    def gradients(point: Tensor) -> Tensor:
        # Rows: the gradients of the products β_i (Ĝβ)_i, i in A.
        return (torch.diag(gramian @ point) + point.unsqueeze(1) * gramian)[active]

    candidate = beta
    multipliers = torch.linalg.lstsq(gradients(beta).T, cost.unsqueeze(1)).solution.squeeze(1)
    previous_size = math.inf
    for _ in range(30):
        rows = gradients(candidate)
        residuals = torch.cat(
            [_constraints(gramian, candidate)[1][active], rows.T @ multipliers - cost]
        )
        size = float(residuals.abs().max())
        # Quadratic convergence stops at the rounding errors.
        if not size < 0.5 * previous_size:
            break
        previous_size = size
        # The Hessian of Σ μ_i β_i (Ĝβ)_i is D Ĝ + Ĝ D, with D = diag(μ) (zero off A).
        weights = torch.zeros(n, dtype=beta.dtype).index_copy_(0, active, multipliers)
        curvature = weights.unsqueeze(1) * gramian
        jacobian = torch.cat(
            [
                torch.cat([rows, torch.zeros(len(active), len(active), dtype=beta.dtype)], 1),
                torch.cat([curvature + curvature.T, rows.T], 1),
            ]
        )
        step = torch.linalg.lstsq(jacobian, -residuals.unsqueeze(1), driver="gelsd").solution
        candidate = candidate + step[:n, 0]
        multipliers = multipliers + step[n:, 0]
    # The constraints are homogeneous of degree 2: scaling β by s multiplies β_i (Ĝβ)_i by s² (and
    # the gradients of the constraints by s, so the multipliers by 1/s). When the polished point
    # violates constraints by rounding errors, a few scalings of 1 + O(violation) make it feasible
    # as computed, like the barrier's points; a larger violation is not certified.
    for _ in range(3):
        smallest = float(_constraints(gramian, candidate)[1].min())
        if smallest >= 0.0 or not smallest >= -_SCALED_VIOLATION:
            break
        scaling = math.sqrt(1.0 / (1.0 + smallest)) * (1.0 + 4.0 * torch.finfo(beta.dtype).eps)
        candidate, multipliers = candidate * scaling, multipliers / scaling
    products, slacks = _constraints(gramian, candidate)
    stationarity = gradients(candidate).T @ multipliers - cost
    scale = float(cost.abs().max()) + float(multipliers.abs() @ gradients(candidate).abs().amax(1))
    certified = (
        bool(torch.isfinite(candidate).all())
        and bool((candidate > 0).all() and (products > 0).all())
        and float(slacks.min()) >= 0.0
        and float(multipliers.min()) >= 0.0
        and float(stationarity.abs().max()) <= 1e-12 * scale
        and float(cost @ candidate) <= float(cost @ beta) * (1.0 + 1e-10)
    )
    return candidate if certified else beta


def _centre(gramian: Tensor, cost: Tensor, beta: Tensor, t: float) -> tuple[Tensor, str]:
    """Minimise ``t kᵀβ - Σ log(β_i (Ĝβ)_i - 1)`` by Newton's method from ``beta``.

    Returns the last iterate and ``"centred"``, ``"unbounded"`` (an iterate has ``kᵀβ < 0``) or
    ``"stalled"`` (rounding errors prevent convergence).

    The function is self-concordant, so the damped step ``1 / (1 + λ)`` (``λ²`` the Newton
    decrement) stays feasible and decreases it, and full steps converge quadratically once
    ``λ < 1/4``: the last steps need no function values, which lose their precision for large
    ``t``."""

    previous_decrement = math.inf
    for _ in range(50):
        products, slacks = _constraints(gramian, beta)
        inverse = 1.0 / slacks
        gradient = t * cost - products * inverse - gramian @ (beta * inverse)
        rows = torch.diag(products) + beta.unsqueeze(1) * gramian  # gradients of the products
        hessian = (rows * inverse.unsqueeze(1) ** 2).T @ rows
        hessian = hessian - inverse.unsqueeze(1) * gramian - gramian * inverse.unsqueeze(0)
        step = -_solve_psd(hessian, gradient)
        decrement = float(-(gradient @ step))
        if not math.isfinite(decrement):
            return beta, "stalled"
        if decrement <= 0.0:
            return beta, "centred"
        pure_newton = decrement < 0.0625
        if pure_newton and decrement > 0.5 * previous_decrement:
            # Quadratic convergence has stopped: the rounding errors dominate.
            return beta, "centred"
        damped = 1.0 / (1.0 + math.sqrt(decrement))
        size = 1.0 if pure_newton else _backtrack(gramian, cost, beta, step, t, decrement, damped)
        for _ in range(30):
            if _is_strictly_feasible(gramian, beta + size * step):
                break
            size /= 2.0
        else:
            return beta, "stalled"
        beta = beta + size * step
        if float(cost @ beta) < 0.0:
            return beta, "unbounded"
        if pure_newton:
            previous_decrement = decrement
            if decrement <= 1e-10:
                return beta, "centred"
    return beta, "stalled"


def _backtrack(
    gramian: Tensor,
    cost: Tensor,
    beta: Tensor,
    step: Tensor,
    t: float,
    decrement: float,
    damped: float,
) -> float:
    """The largest of ``1, 1/2, 1/4, ...`` above ``damped`` that gives a feasible point and a
    sufficient decrease, else ``damped`` (which is always feasible and decreasing)."""

    current = _barrier_value(gramian, cost, beta, t)
    tolerance = 1e-12 * (abs(current) + 1.0)
    size = 1.0
    while size > damped:
        candidate = beta + size * step
        if _is_strictly_feasible(gramian, candidate):
            value = _barrier_value(gramian, cost, candidate, t)
            if value <= current - 0.25 * size * decrement + tolerance:
                return size
        size /= 2.0
    return damped


def _barrier_value(gramian: Tensor, cost: Tensor, beta: Tensor, t: float) -> float:
    _, slacks = _constraints(gramian, beta)
    return t * float(cost @ beta) - float(torch.log(slacks).sum())


def _solve_psd(matrix: Tensor, rhs: Tensor) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
    return torch.linalg.lstsq(matrix, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
