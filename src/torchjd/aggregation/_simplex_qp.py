"""Exact active-set solver of small convex quadratic programs over the probability simplex.

It minimises ``½ wᵀ G w + qᵀ w`` over ``{w : w ≥ 0, Σ w = 1}`` for a positive semi-definite ``G``
and a ``q`` in ``range(G) + span(1)`` (so that the problem is the search for the point of a
polytope nearest to a given point: with ``G = P Pᵀ`` and ``q = P v + κ 1``, it is ``min ‖Pᵀw + v‖``
over the convex hull of the rows of ``P``). This is Wolfe's minimum-norm-point algorithm (Wolfe,
1976, "Finding the nearest point in a polytope"), written with the Gram matrix only: its
"corral" is a set of affinely independent points whose affine hull holds the current point, so
that every linear system it solves is non-singular even when ``G`` is rank-deficient, and it ends
after finitely many steps at a point whose optimality it checks (the Frank-Wolfe gap).

The problems are small (one variable per objective) and the algorithm branches on the data, so it
runs on the CPU in float64; callers move their Gramian there once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Relative tolerance of the optimality test, relative to the magnitude of the gradient entries.
_GAP_RTOL = 1e-13
# A corral weight at or below this is treated as zero (the weights sum to one).
_WEIGHT_TOL = 1e-14


@dataclass(frozen=True)
class SimplexQPSolution:
    """A minimiser over the simplex and its support.

    :param weights: The minimiser, of length ``m``, on the simplex.
    :param support: The indices of the corral: affinely independent points holding the minimiser
        in the relative interior of their convex hull (the other weights are zero).
    """

    weights: Tensor
    support: tuple[int, ...]


def affine_minimizer(gramian: Tensor, linear: Tensor) -> Tensor:
    """Return the minimiser of ``½ wᵀ G w + qᵀ w`` subject to ``Σ w = 1`` only (no sign
    constraint), for ``G`` positive definite on ``{d : Σ d = 0}``.

    Adding ``κ 1 1ᵀ`` to ``G`` changes the objective by a constant on the constraint, and makes the
    matrix positive definite exactly when the corresponding points are affinely independent
    (Wolfe's trick), so one Cholesky factorisation gives the solution.

    :param gramian: The ``k x k`` matrix ``G``.
    :param linear: The vector ``q`` of length ``k``.
    """

    k = gramian.shape[0]
    ones = torch.ones(k, dtype=gramian.dtype, device=gramian.device)
    # κ of the order of G keeps the shifted matrix as well conditioned as the points allow.
    largest = float(gramian.diagonal().abs().max())
    kappa = largest if largest > 0.0 else 1.0
    shifted = gramian + kappa
    rhs = torch.stack([ones, -linear], dim=1)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if int(info) == 0:
        solutions = torch.cholesky_solve(rhs, factor)
    else:
        # Numerically affinely dependent points: the least-squares solution is still a minimiser.
        solutions = torch.linalg.pinv(shifted, hermitian=True) @ rhs
    a, c = solutions[:, 0], solutions[:, 1]
    theta = (1.0 - c.sum()) / a.sum()
    return c + theta * a


def minimize_over_simplex(
    gramian: Tensor,
    linear: Tensor | None = None,
    *,
    initial_support: tuple[int, ...] | None = None,
    initial_weights: Tensor | None = None,
) -> SimplexQPSolution:
    """Minimise ``½ wᵀ G w + qᵀ w`` over the probability simplex, exactly.

    :param gramian: The ``m x m`` positive semi-definite matrix ``G`` (float64, CPU).
    :param linear: The vector ``q`` (zeros if ``None``); it must lie in ``range(G) + span(1)``.
    :param initial_support: A warm start: indices of affinely independent points, for instance
        the support of the solution of a nearby problem.
    :param initial_weights: Positive weights on ``initial_support`` (length ``m``); required with
        ``initial_support``.
    """

    m = gramian.shape[0]
    if linear is None:
        linear = torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
    diagonal = gramian.diagonal()

    if initial_support is None or initial_weights is None:
        best_vertex = int(torch.argmin(0.5 * diagonal + linear))
        support = [best_vertex]
        corral_weights = torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    else:
        support = list(initial_support)
        corral_weights = initial_weights[support].clamp(min=0.0)
        corral_weights = corral_weights / corral_weights.sum()
        support, corral_weights = _minor_cycles(gramian, linear, support, corral_weights)

    weights = _scatter(corral_weights, support, m)
    gradient = gramian @ weights + linear
    value = float(weights @ (gradient + linear)) / 2
    max_steps = 20 * m + 50
    for _ in range(max_steps):
        entering = int(torch.argmin(gradient))
        gap = float(weights @ gradient - gradient[entering])
        scale = max(float(gradient.abs().max()), float(diagonal.max()), 1e-300)
        if gap <= _GAP_RTOL * scale or entering in support:
            break
        new_support, new_corral_weights = _minor_cycles(
            gramian,
            linear,
            [*support, entering],
            torch.cat([corral_weights, corral_weights.new_zeros(1)]),
        )
        new_weights = _scatter(new_corral_weights, new_support, m)
        new_gradient = gramian @ new_weights + linear
        new_value = float(new_weights @ (new_gradient + linear)) / 2
        # Every major cycle strictly decreases the objective in exact arithmetic; when rounding
        # stops it from doing so, the current point is optimal to working precision.
        if new_value >= value:
            break
        support, corral_weights = new_support, new_corral_weights
        weights, gradient, value = new_weights, new_gradient, new_value

    return SimplexQPSolution(weights, tuple(support))


def _minor_cycles(
    gramian: Tensor, linear: Tensor, support: list[int], corral_weights: Tensor
) -> tuple[list[int], Tensor]:
    """Move towards the affine minimiser of the corral, dropping the points whose weight falls to
    zero, until the affine minimiser has positive weights."""

    while True:
        index = torch.tensor(support)
        target = affine_minimizer(gramian[index][:, index], linear[index])
        if bool((target > _WEIGHT_TOL).all()):
            return support, target
        blocking = (target <= _WEIGHT_TOL) & (corral_weights > target)
        ratios = corral_weights[blocking] / (corral_weights[blocking] - target[blocking])
        step = float(ratios.min()) if ratios.numel() > 0 else 0.0
        corral_weights = corral_weights + step * (target - corral_weights)
        keep = corral_weights > _WEIGHT_TOL
        if bool(keep.all()):
            # Rounding left every weight positive: drop the most blocking point, so that the
            # corral shrinks and the loop ends.
            keep[int(torch.argmin(corral_weights))] = False
        support = [j for j, kept in zip(support, keep.tolist()) if kept]
        corral_weights = corral_weights[keep]
        corral_weights = corral_weights / corral_weights.sum()
        if len(support) == 1:
            return support, torch.ones_like(corral_weights)


def _scatter(corral_weights: Tensor, support: list[int], m: int) -> Tensor:
    weights = corral_weights.new_zeros(m)
    weights[torch.tensor(support)] = corral_weights
    return weights
