from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import WeightedAggregator
from ._weighting_bases import Weighting


class SumWeighting(Weighting[Tensor]):
    """Gives every row the weight ``1``. Only the number of rows of its input is used.

    >>> import torch
    >>> from torchjd.aggregation import SumWeighting
    >>> SumWeighting()(torch.zeros(3, 3))
    tensor([1., 1., 1.])
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        return torch.ones(stat.shape[0], dtype=stat.dtype, device=stat.device)


class Sum(WeightedAggregator):
    """Sums the rows of the matrix.

    >>> import torch
    >>> from torchjd.aggregation import Sum
    >>> Sum()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([2., 2., 2.])
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())
