from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._non_differentiable import mark_non_differentiable
from ._simplex_qp import affine_minimizer, minimize_over_simplex
from ._utils import PSDMatrix, check_is_square_matrix, in_float32_if_low_precision, normalize
from ._weighting_bases import Weighting

# Below this norm (in the units of the trace-normalised Gramian), the minimiser of CAGrad's
# subproblem is taken to be the origin, whatever `norm_eps` is: its direction is then undefined.
_NEGLIGIBLE_NORM = 1e-12


class CAGradWeighting(Weighting[PSDMatrix]):
    r"""Gramian weighting of :class:`CAGrad`.

    With ``G`` the Gramian normalised by its trace, ``u = 1/m`` and ``s = c·sqrt(uᵀGu)`` (``c``
    times the norm of the mean normalised gradient), it solves
    ``min_{w ∈ simplex} (Gu)ᵀw + s·sqrt(wᵀGw)`` exactly and returns ``u + (s / r)·w*`` with
    ``r = sqrt(w*ᵀGw*)``, or zeros if ``r < norm_eps`` (the mean gradient is then already on the
    Pareto front, or the matrix is too small).

    The subproblem is solved by our own exact solver (a search on the multiplier of the norm term,
    whose every step is a quadratic program over the simplex solved by an active-set method, and
    which ends with a closed-form solution on the optimal support). It runs on the CPU in float64:
    the ``m x m`` Gramian is copied to the host once per call, and the weights back.

    :param c: The radius of the ball around the mean gradient in which the update is searched,
        relative to the norm of the mean gradient. Must be non-negative.
    :param norm_eps: The threshold on the trace of the Gramian below which it is treated as zero,
        and on ``r`` below which the weights are zero.

    >>> import torch
    >>> from torchjd.aggregation import CAGradWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> CAGradWeighting(c=0.5)(J @ J.T)
    tensor([0.7041, 0.5000])
    """

    def __init__(self, c: float, norm_eps: float = 0.0001) -> None:
        super().__init__()
        if isinstance(c, bool) or not isinstance(c, Real) or not c >= 0 or math.isinf(c):
            raise ValueError(f"Parameter `c` should be a non-negative float. Found `c = {c}`.")
        if (
            isinstance(norm_eps, bool)
            or not isinstance(norm_eps, Real)
            or not norm_eps >= 0
            or math.isinf(norm_eps)
        ):
            raise ValueError(
                "Parameter `norm_eps` should be a non-negative float. Found `norm_eps = "
                f"{norm_eps}`."
            )
        self.c: float = c
        self.norm_eps: float = norm_eps

    @in_float32_if_low_precision
    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        check_is_square_matrix(gramian)
        # The solver branches on the data: the m x m Gramian goes to the host once.
        host_gramian = gramian.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(host_gramian).all()):
            raise ValueError("Parameter `gramian` should only contain finite values.")
        if host_gramian.diagonal().sum().item() == 0.0:
            normalized = torch.zeros_like(host_gramian)  # Even with `norm_eps = 0`.
        else:
            normalized = normalize(host_gramian, self.norm_eps)
        weights = _cagrad_weights(normalized, float(self.c), float(self.norm_eps))
        return weights.to(device=gramian.device, dtype=gramian.dtype)


class CAGrad(GramianWeightedAggregator):
    r"""Conflict-Averse Gradient descent (`Liu et al., 2021 <https://arxiv.org/pdf/2110.14048>`_).

    Searches, in the ball of radius ``c·‖g0‖`` around the mean gradient ``g0`` (of the rows
    normalised together by the Frobenius norm of the matrix), the direction that maximises the
    smallest improvement of the objectives, and returns the matching combination of the rows of
    the matrix. With ``c = 0`` it is the mean; with ``c ≥ 1`` the result does not conflict with any
    row. See :class:`CAGradWeighting` for the computation.

    :param c: The radius of the ball, relative to the norm of the mean gradient. Must be
        non-negative.
    :param norm_eps: The threshold under which the matrix (or the solution of the subproblem) is
        treated as zero, in which case the result is the zero vector.

    >>> import torch
    >>> from torchjd.aggregation import CAGrad
    >>> CAGrad(c=0.5)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1835, 1.2041, 1.2041])
    """

    def __init__(self, c: float, norm_eps: float = 0.0001) -> None:
        super().__init__(CAGradWeighting(c=c, norm_eps=norm_eps))
        self._c = c
        self._norm_eps = norm_eps
        mark_non_differentiable(self)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(c={self._c}, norm_eps={self._norm_eps})"

    def __str__(self) -> str:
        # Mirrors the original, including its quirk: `c=10` prints as `CAGrad1`.
        return f"CAGrad{str(self._c).rstrip('0')}"


def _cagrad_weights(gramian: Tensor, c: float, norm_eps: float) -> Tensor:
    """Return CAGrad's weights for the trace-normalised Gramian ``gramian`` (float64, CPU)."""

    m = gramian.shape[0]
    if m == 0:
        return gramian.new_zeros(0)
    mean_weights = gramian.new_full((m,), 1.0 / m)
    linear = gramian @ mean_weights
    mean_norm = math.sqrt(max(float(mean_weights @ linear), 0.0))
    radius = c * mean_norm
    zero_threshold = max(norm_eps, _NEGLIGIBLE_NORM)

    if radius == 0.0:
        # The subproblem is the linear program min (Gu)ᵀw. Its solution set is a face of the
        # simplex; the solutions for a small positive radius tend to the point of smallest norm of
        # that face, which decides between the mean and zeros (the norm term then has weight 0).
        lowest = linear.min()
        tolerance = 1e-12 * max(float(linear.abs().max()), float(gramian.diagonal().max()), 1e-300)
        face = torch.nonzero(linear <= lowest + tolerance).flatten()
        face_gramian = gramian[face][:, face]
        face_weights = minimize_over_simplex(face_gramian).weights
        norm = math.sqrt(max(float(face_weights @ face_gramian @ face_weights), 0.0))
        return mean_weights if norm >= zero_threshold else torch.zeros_like(mean_weights)

    weights = _solve_cagrad_subproblem(gramian, linear, radius, zero_threshold)
    norm = math.sqrt(max(float(weights @ gramian @ weights), 0.0))
    if norm < zero_threshold:
        return torch.zeros_like(mean_weights)
    return mean_weights + (radius / norm) * weights


def _solve_cagrad_subproblem(
    gramian: Tensor, linear: Tensor, radius: float, zero_threshold: float
) -> Tensor:
    r"""Minimise ``bᵀw + s·sqrt(wᵀGw)`` over the simplex, with ``b = G u`` (``linear``) and
    ``s > 0`` (``radius``).

    With ``x(w)`` the combination of the (normalised) gradients, the objective is
    ``g0ᵀx + s‖x‖`` over their convex hull. Its minimiser, when not the origin, is the solution of
    the quadratic program ``QP(τ) = min_w ½wᵀGw + τ bᵀw`` (the projection of ``-τ g0`` on the
    hull) for the ``τ > 0`` such that ``‖x(τ)‖ = s τ``. Since ``‖x(τ)‖ / τ`` is non-increasing, the
    sign of ``ψ(τ) = ‖x(τ)‖ - s τ`` goes from positive to negative exactly once, at the solution:
    we bracket it. On a fixed support, ``w(τ)`` is affine in ``τ`` and ``‖x(τ)‖² = s²τ²`` is a
    quadratic equation, solved in closed form; the root is accepted when the weights it gives are
    non-negative and satisfy the optimality conditions of ``QP(τ)``, which makes the result exact.
    Otherwise the root (or the middle of the bracket) is the next ``τ`` to evaluate.
    """

    largest_norm = math.sqrt(float(gramian.diagonal().max()))
    low, high = 0.0, 2.0 * largest_norm / radius

    solution = minimize_over_simplex(gramian)
    support, weights = solution.support, solution.weights
    tried: set[tuple[int, ...]] = set()
    for _ in range(200):
        if radius * high < 0.5 * zero_threshold:
            # The norm of the minimiser is at most s·high: the weights will be zero anyway.
            return _project_to_simplex(weights)
        candidate = None
        if support not in tried:
            tried.add(support)
            candidate = _root_on_support(
                gramian, linear, radius, support, max(low, 0.5 * zero_threshold / radius), high
            )
        if candidate is not None:
            tau, candidate_weights = candidate
            if _is_optimal_for_qp(gramian, linear, tau, candidate_weights, support):
                return _project_to_simplex(candidate_weights)
        else:
            tau = -1.0
        if not low < tau < high:
            # Without a positive lower bound yet, the solution may be at the origin: shrink fast.
            tau = 0.5 * (low + high) if low > 0.0 else high / 16.0
        solution = minimize_over_simplex(
            gramian, tau * linear, initial_support=support, initial_weights=weights
        )
        support, weights = solution.support, solution.weights
        norm = math.sqrt(max(float(weights @ gramian @ weights), 0.0))
        if norm > radius * tau:
            low = tau
        else:
            high = tau
        if high - low <= 1e-15 * high:
            break
    return _project_to_simplex(weights)


def _root_on_support(
    gramian: Tensor,
    linear: Tensor,
    radius: float,
    support: tuple[int, ...],
    low: float,
    high: float,
) -> tuple[float, Tensor] | None:
    """Solve ``‖x(τ)‖ = s τ`` in ``[low, high]`` assuming the support of ``QP(τ)`` is ``support``;
    return ``τ`` and the weights, or ``None`` if there is no such root."""

    index = torch.tensor(support)
    sub_gramian = gramian[index][:, index]
    sub_linear = linear[index]
    base = affine_minimizer(sub_gramian, torch.zeros_like(sub_linear))
    slope = affine_minimizer(sub_gramian, sub_linear) - base
    constant = float(base @ sub_gramian @ base)
    cross = float(base @ sub_gramian @ slope)
    quadratic = float(slope @ sub_gramian @ slope) - radius**2
    roots = _quadratic_roots(quadratic, 2.0 * cross, constant)
    slack = 1e-12 * high
    for tau in roots:
        # ψ changes sign from + to - at the solution, so the derivative of the quadratic is <= 0.
        decreasing = 2.0 * quadratic * tau + 2.0 * cross <= 1e-12 * max(abs(cross), radius**2 * tau)
        if low - slack <= tau <= high + slack and tau > 0.0 and decreasing:
            weights = gramian.new_zeros(gramian.shape[0])
            weights[index] = base + tau * slope
            return tau, weights
    return None


def _quadratic_roots(a: float, b: float, c: float) -> list[float]:
    """Real roots of ``a t² + b t + c``, in increasing order, computed without cancellation."""

    scale = max(abs(a), abs(b), abs(c))
    if scale == 0.0:
        return []
    if abs(a) <= 1e-14 * scale:
        return [] if b == 0.0 else [-c / b]
    discriminant = b * b - 4.0 * a * c
    if discriminant < 0.0:
        if discriminant > -1e-12 * b * b:
            return [-b / (2.0 * a)]
        return []
    q = -0.5 * (b + math.copysign(math.sqrt(discriminant), b))
    roots = [q / a]
    if q != 0.0:
        roots.append(c / q)
    return sorted(roots)


def _is_optimal_for_qp(
    gramian: Tensor, linear: Tensor, tau: float, weights: Tensor, support: tuple[int, ...]
) -> bool:
    """Whether ``weights`` (supported on ``support``) satisfy the optimality conditions of
    ``QP(τ)``: non-negative, and no vertex with a smaller directional derivative."""

    if float(weights[torch.tensor(support)].min()) < -1e-12:
        return False
    gradient = gramian @ weights + tau * linear
    gap = float(weights @ gradient - gradient.min())
    scale = max(float(gradient.abs().max()), float(gramian.diagonal().max()), 1e-300)
    return gap <= 1e-10 * scale


def _project_to_simplex(weights: Tensor) -> Tensor:
    """Remove rounding-level negative entries and renormalise."""

    clamped = weights.clamp(min=0.0)
    return clamped / clamped.sum()
