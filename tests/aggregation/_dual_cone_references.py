"""Slow, obviously correct references for the dual-cone problems ``min vᵀGv s.t. v ≥ u``."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def kkt_violation(gramian: Tensor, lower: Tensor, solution: Tensor) -> float:
    """Largest relative violation of the KKT conditions of ``min vᵀGv s.t. v ≥ u`` (per row:
    ``λ = 2 G v`` must be non-negative, and zero wherever ``v > u``). Primal feasibility is
    required exactly."""
    assert (solution >= lower).all(), "v >= u violated"
    multipliers = solution @ gramian  # λ / 2
    # Natural scales, per row: of the terms of G v and G u, and of v and u.
    magnitudes = solution.abs() + lower.abs()
    product_scale = (magnitudes @ gramian.abs()).amax(dim=1, keepdim=True)
    gap = solution - lower
    gap_scale = torch.maximum(solution.abs(), lower.abs()).amax(dim=1, keepdim=True)
    product_scale = product_scale.clamp_min(torch.finfo(gramian.dtype).tiny)
    gap_scale = gap_scale.clamp_min(torch.finfo(gramian.dtype).tiny)
    negativity = (-multipliers / product_scale).clamp_min(0.0)
    # Complementarity: each index is either at its bound or has a zero multiplier.
    complementarity = torch.minimum(gap / gap_scale, multipliers.abs() / product_scale)
    return max(negativity.max().item(), complementarity.max().item())


def solution_scale(expected: Tensor, lower: Tensor) -> float:
    """The natural scale of the solutions, for relative tolerances: that of ``v`` and of ``u``
    (``v`` alone can be zero up to rounding errors of the order of ``u``)."""
    return max(expected.abs().max().item(), lower.abs().max().item())


def brute_force(gramian: Tensor, lower: Tensor) -> Tensor:
    """The minimiser for one ``u``, by trying every free set (``m`` small, ``G`` positive
    definite): the one whose solution has ``x ≥ 0`` on it and ``G v ≥ 0`` off it."""
    m = gramian.shape[0]
    linear = gramian @ lower
    best: Tensor | None = None
    best_violation = float("inf")
    for size in range(m + 1):
        for free in itertools.combinations(range(m), size):
            offsets = torch.zeros(m, dtype=gramian.dtype)
            if free:
                index = torch.tensor(free)
                offsets[index] = torch.linalg.solve(gramian[index][:, index], -linear[index])
            products = gramian @ offsets + linear
            mask = torch.zeros(m, dtype=torch.bool)
            mask[list(free)] = True
            violation = max(
                (-offsets[mask]).clamp_min(0).max().item() if free else 0.0,
                (-products[~mask]).clamp_min(0).max().item() if size < m else 0.0,
            )
            if violation < best_violation:
                best, best_violation = lower + offsets.clamp_min(0), violation
    assert best is not None
    return best
