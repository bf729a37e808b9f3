from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._utils import PSDMatrix, in_float32_if_low_precision
from ._weighting_bases import Weighting


class MGDAWeighting(Weighting[PSDMatrix]):
    r"""Weights of the minimum-norm point of the convex hull of the rows, from their Gramian.

    Runs the Frank–Wolfe algorithm of `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_ (Algorithm 2) on the simplex: starting from ``1/m`` each,
    it repeatedly moves towards the vertex ``e_t`` with ``t = argmin(G α)``, with the exact line
    search step ``γ``, and stops after the first step with ``γ < epsilon`` or after ``max_iters``
    steps.

    The stopping test depends on the data. On CPU it is checked after each step (reading a CPU
    scalar costs nothing). On other devices, checking it would wait for the device at every step,
    so all ``max_iters`` steps are run and the iterate is frozen (with :func:`torch.where`) from
    the step where it would have stopped: the result is the same, with no host synchronisation.

    :param epsilon: The step size below which the iterations stop.
    :param max_iters: The maximum number of Frank–Wolfe steps.

    >>> import torch
    >>> from torchjd.aggregation import MGDAWeighting
    >>> MGDAWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([0.6000, 0.4000])
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        if max_iters < 0:
            raise ValueError(
                "Parameter `max_iters` should be a non-negative integer. Found `max_iters = "
                f"{max_iters}`."
            )
        self.epsilon = epsilon
        self.max_iters = max_iters

    @in_float32_if_low_precision
    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        return _frank_wolfe(
            gramian,
            epsilon=self.epsilon,
            max_iters=self.max_iters,
            stop_on_host=gramian.device.type == "cpu",
        )


def _frank_wolfe(
    gramian: PSDMatrix, *, epsilon: float, max_iters: int, stop_on_host: bool
) -> Tensor:
    """Minimise ``αᵀ G α`` over the simplex; see :class:`MGDAWeighting`.

    With ``stop_on_host``, the loop is left after the first step with ``γ < epsilon``; without, all
    ``max_iters`` steps run and the iterate is frozen from that step on (same result, no sync).
    """
    m = gramian.shape[0]
    # (An empty Gramian is left to fail in `argmin`, with an IndexError.)
    alpha = torch.ones(m, dtype=gramian.dtype, device=gramian.device) / m
    converged = torch.zeros((), dtype=torch.bool, device=gramian.device)
    indices = torch.arange(m, device=gramian.device)
    diagonal = gramian.diagonal()
    for _ in range(max_iters):
        gramian_alpha = gramian @ alpha
        # The vertex e_t is used as a one-hot vector rather than through indexing: indexing with a
        # 0-d device tensor would read the index on the host.
        vertex = (indices == torch.argmin(gramian_alpha)).to(gramian.dtype)
        a = gramian_alpha @ vertex  # αᵀ G e_t (G is symmetric)
        b = alpha @ gramian_alpha  # αᵀ G α
        c = diagonal @ vertex  # e_tᵀ G e_t
        interior = (c > a) & (b > a)
        # The denominator is only positive where `interior` holds; elsewhere it is replaced so that
        # the discarded branch does not produce NaNs (which would poison gradients).
        denominator = torch.where(interior, b + c - 2 * a, torch.ones_like(a))
        gamma = torch.where(
            c <= a,
            torch.ones_like(a),
            torch.where(b <= a, torch.zeros_like(a), (b - a) / denominator),
        )
        updated_alpha = (1 - gamma) * alpha + gamma * vertex
        if stop_on_host:
            alpha = updated_alpha
            if gamma < epsilon:
                break
        else:
            alpha = torch.where(converged, alpha, updated_alpha)
            converged = converged | (gamma < epsilon)
    return alpha


class MGDA(GramianWeightedAggregator):
    r"""Multiple-gradient descent: the minimum-norm point of the convex hull of the rows.

    Its weighting is :class:`MGDAWeighting` (see there for the algorithm and its device
    behaviour); the aggregation is differentiable.

    :param epsilon: The step size below which the Frank–Wolfe iterations stop.
    :param max_iters: The maximum number of Frank–Wolfe steps.

    >>> import torch
    >>> from torchjd.aggregation import MGDA
    >>> MGDA()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0., 1., 1.])
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__(MGDAWeighting(epsilon=epsilon, max_iters=max_iters))
        self._epsilon = epsilon
        self._max_iters = max_iters

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(epsilon={self._epsilon}, max_iters={self._max_iters})"
