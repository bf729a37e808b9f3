from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._utils import PSDMatrix, in_float32_if_low_precision
from ._weighting_bases import Weighting


class KrumWeighting(Weighting[PSDMatrix]):
    r"""Weights of (Multi-)Krum (`Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent <https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html>`_),
    from the Gramian of the rows.

    Each row is scored by the sum of its distances to its ``m - n_byzantine - 2`` nearest other
    rows (distances are read from the Gramian: ``‖g_i - g_j‖² = G_ii + G_jj - 2 G_ij``); the
    ``n_selected`` rows of smallest score get the weight ``1 / n_selected``, the others ``0``.
    Ties are broken as by :func:`torch.topk`.

    :param n_byzantine: The number of rows that may be adversarial.
    :param n_selected: The number of rows to average.

    >>> import torch
    >>> from torchjd.aggregation import KrumWeighting
    >>> J = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0], [1.0, 2.0, 3.0]])
    >>> KrumWeighting(n_byzantine=1, n_selected=2)(J @ J.T)
    tensor([0.5000, 0.5000, 0.0000, 0.0000])
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__()
        if n_byzantine < 0:
            raise ValueError(
                "Parameter `n_byzantine` should be a non-negative integer. Found `n_byzantine = "
                f"{n_byzantine}`."
            )
        if n_selected < 1:
            raise ValueError(
                "Parameter `n_selected` should be a positive integer. Found `n_selected = "
                f"{n_selected}`."
            )
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    @in_float32_if_low_precision
    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        self._check_gramian_size(gramian)
        m = gramian.shape[0]
        squared_norms = gramian.diagonal()
        squared_distances = squared_norms.unsqueeze(0) + squared_norms.unsqueeze(1) - 2 * gramian
        # Squared distances are non-negative; clamping only removes round-off (which would give
        # NaN distances and break the ordering).
        distances = squared_distances.clamp(min=0).sqrt()
        n_closest = m - self.n_byzantine - 2
        smallest = torch.topk(distances, n_closest + 1, dim=-1, largest=False).values
        # The smallest distance of each row is assumed to be its distance to itself (zero).
        scores = smallest[:, 1:].sum(dim=-1)
        selected = torch.topk(scores, self.n_selected, largest=False).indices
        weights = torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        return weights.index_fill(0, selected, 1 / self.n_selected)

    def _check_gramian_size(self, gramian: PSDMatrix) -> None:
        m = gramian.shape[0]
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Parameter `gramian` should have at least {self.n_byzantine + 3} rows "
                f"(n_byzantine + 3). Found `gramian` with {m} rows."
            )
        if m < self.n_selected:
            raise ValueError(
                f"Parameter `gramian` should have at least {self.n_selected} rows (n_selected). "
                f"Found `gramian` with {m} rows."
            )


class Krum(GramianWeightedAggregator):
    r"""(Multi-)Krum (`Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent
    <https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html>`_):
    the average of the ``n_selected`` rows closest to their neighbours, robust to up to
    ``n_byzantine`` adversarial rows. See :class:`KrumWeighting`. Differentiable.

    :param n_byzantine: The number of rows that may be adversarial.
    :param n_selected: The number of rows to average.

    >>> import torch
    >>> from torchjd.aggregation import Krum
    >>> J = torch.tensor(
    ...     [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0], [1.0, 2.0, 3.0],
    ...      [2.0, 0.0, 1.0]]
    ... )
    >>> Krum(n_byzantine=1, n_selected=4)(J)
    tensor([1.2500, 0.7500, 1.5000])
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine=n_byzantine, n_selected=n_selected))
        self._n_byzantine = n_byzantine
        self._n_selected = n_selected

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(n_byzantine={self._n_byzantine}, "
            f"n_selected={self._n_selected})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{self._n_byzantine}-{self._n_selected}"
