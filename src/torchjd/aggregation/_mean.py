from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import WeightedAggregator
from ._weighting_bases import Weighting


class MeanWeighting(Weighting[Tensor]):
    """Gives every row the weight ``1/m``. Only the number of rows of its input is used, so it
    applies to a matrix and to a Gramian alike.

    >>> import torch
    >>> from torchjd.aggregation import MeanWeighting
    >>> MeanWeighting()(torch.zeros(2, 2))
    tensor([0.5000, 0.5000])
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        return torch.full((m,), 1 / m, dtype=stat.dtype, device=stat.device)


class Mean(WeightedAggregator):
    """Averages the rows of the matrix.

    >>> import torch
    >>> from torchjd.aggregation import Mean
    >>> Mean()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([1., 1., 1.])
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())
