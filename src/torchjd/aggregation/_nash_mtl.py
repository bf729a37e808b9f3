from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor

from ._aggregator_bases import WeightedAggregator
from ._nash_mtl_solver import solve_nash_mtl_subproblem
from ._non_differentiable import mark_non_differentiable
from ._utils import Matrix, in_float32_if_low_precision
from ._weighting_bases import Weighting


class _NashMTLWeighting(Weighting[Matrix]):
    """Stateful weighting of :class:`NashMTL`.

    Its state (restored by :meth:`reset`) is:

    * ``step``: the number of matrices seen so far (``0`` initially);
    * ``prvs_alpha``: the last weights computed, before any rescaling by ``max_norm`` (float64,
      CPU; ones initially);
    * ``normalization_factor``: the Frobenius norm of the Gramian of the last matrix whose weights
      were computed (``1.0`` initially).

    See :class:`NashMTL` for the meaning of the parameters.
    """

    def __init__(
        self, n_tasks: int, max_norm: float, update_weights_every: int, optim_niter: int
    ) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.step = 0
        self.prvs_alpha = torch.ones(n_tasks, dtype=torch.float64)
        self.normalization_factor = 1.0
        self.reset()

    def reset(self) -> None:
        """Forget every matrix seen so far: restore the initial state."""
        self.step = 0
        self.prvs_alpha = torch.ones(self.n_tasks, dtype=torch.float64)
        self.normalization_factor = 1.0

    @in_float32_if_low_precision
    def forward(self, matrix: Matrix, /) -> Tensor:
        if matrix.ndim != 2 or matrix.shape[0] != self.n_tasks:
            raise ValueError(
                f"Parameter `matrix` should have `n_tasks = {self.n_tasks}` rows (one per task). "
                f"Found `matrix.shape = {matrix.shape}`."
            )
        if self.step % self.update_weights_every == 0:
            self.step += 1
            self._update_weights(matrix.detach())
        else:
            self.step += 1

        weights = self.prvs_alpha.to(device=matrix.device, dtype=matrix.dtype)
        if self.max_norm > 0:
            # Rescale to `max_norm` only when the combination is longer; no host-side test.
            norm = torch.linalg.vector_norm(weights @ matrix.detach())
            max_norm = torch.tensor(self.max_norm, dtype=norm.dtype, device=norm.device)
            weights = weights * (max_norm / torch.maximum(norm, max_norm))
        return weights

    def _update_weights(self, matrix: Tensor) -> None:
        # The iterations branch on the solutions: the n x n Gramian goes to the host once.
        gramian = (matrix @ matrix.T).to(device="cpu", dtype=torch.float64)
        normalization_factor = float(torch.linalg.matrix_norm(gramian))
        self.normalization_factor = normalization_factor
        if not 0.0 < normalization_factor < math.inf:
            return  # Zero (or non-finite) matrix: no Nash bargaining solution; keep the weights.
        gramian = gramian / normalization_factor
        epsilon = 1.0 / normalization_factor

        alpha = self.prvs_alpha
        for _ in range(self.optim_niter):
            if _is_bargaining_solution(gramian, alpha):
                break
            new_alpha = solve_nash_mtl_subproblem(gramian, epsilon, alpha)
            if new_alpha is None or float(torch.linalg.vector_norm(new_alpha - alpha)) < 1e-6:
                break
            alpha = new_alpha
        self.prvs_alpha = alpha


def _is_bargaining_solution(normalized_gramian: Tensor, alpha: Tensor) -> bool:
    """The original's first stopping criterion (with the normalised Gramian, as it does)."""
    residual = normalized_gramian @ alpha - 1.0 / (alpha + 1e-10)
    return float(torch.linalg.vector_norm(residual)) < 1e-3


class NashMTL(WeightedAggregator):
    r"""Nash-MTL (`Navon et al., 2022 <https://arxiv.org/pdf/2202.01017>`_): weights ``α > 0`` of
    the rows ``g_i`` solving the bargaining condition ``α_i gᵢᵀ(Σ_j α_j g_j) = 1`` for all ``i``,
    computed as in the official implementation, which is adapted here with its flaws.

    The weights are searched by iterating up to ``optim_niter`` times a convex subproblem (a
    linearisation of the condition, with the Gramian normalised by its Frobenius norm), from the
    previous weights; the iterations stop early when the weights satisfy the condition for the
    *normalised* Gramian, when they stop changing (by less than ``1e-6``), or when the subproblem
    has no solution (then the weights stay as they were). The subproblem is solved exactly by our
    own solver (``cvxpy`` is not needed). The combination is then rescaled so that its norm is at
    most ``max_norm``.

    .. warning::
        This aggregator is **stateful**: its result depends on the matrices it has seen before
        (the previous weights are the starting point of the iterations, and with
        ``update_weights_every > 1`` they are reused as they are). Call :meth:`reset` between
        independent experiments. The state lives in ``self.weighting``: ``step`` (the number of
        calls so far), ``prvs_alpha`` (the last weights, before rescaling) and
        ``normalization_factor``.

    The computation runs on the CPU in float64: on each update step, the ``n_tasks x n_tasks``
    Gramian is copied to the host, and the weights back.

    :param n_tasks: The number of tasks, i.e. of rows of the matrices to aggregate.
    :param max_norm: The largest norm of the result; ``0`` (or less) disables the rescaling.
    :param update_weights_every: The weights are recomputed on every ``update_weights_every``-th
        call only, starting with the first, and reused in between.
    :param optim_niter: The largest number of subproblems solved per update.

    >>> import torch
    >>> from torchjd.aggregation import NashMTL
    >>> aggregator = NashMTL(n_tasks=2)
    >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0542, 0.7061, 0.7061])
    """

    def __init__(
        self,
        n_tasks: int,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        _check_int("n_tasks", n_tasks, minimum=1, description="a positive integer")
        if isinstance(max_norm, bool) or not isinstance(max_norm, Real) or math.isnan(max_norm):
            raise ValueError(
                f"Parameter `max_norm` should be a float. Found `max_norm = {max_norm}`."
            )
        _check_int(
            "update_weights_every",
            update_weights_every,
            minimum=1,
            description="a positive integer",
        )
        _check_int("optim_niter", optim_niter, minimum=0, description="a non-negative integer")
        super().__init__(
            _NashMTLWeighting(
                n_tasks=n_tasks,
                max_norm=max_norm,
                update_weights_every=update_weights_every,
                optim_niter=optim_niter,
            )
        )
        self._n_tasks: int = n_tasks
        self._max_norm: float = max_norm
        self._update_weights_every: int = update_weights_every
        self._optim_niter: int = optim_niter
        mark_non_differentiable(self)

    def reset(self) -> None:
        """Forget every matrix seen so far: restore the initial state."""
        weighting: _NashMTLWeighting = self.weighting  # type: ignore[assignment]
        weighting.reset()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(n_tasks={self._n_tasks}, max_norm={self._max_norm}, "
            f"update_weights_every={self._update_weights_every}, optim_niter={self._optim_niter})"
        )


def _check_int(name: str, value: int, *, minimum: int, description: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"Parameter `{name}` should be {description}. Found `{name} = {value}`.")
