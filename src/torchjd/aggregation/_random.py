from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import WeightedAggregator
from ._utils import Matrix
from ._weighting_bases import Weighting

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class RandomWeighting(Weighting[Matrix]):
    r"""Random weights: the softmax of ``m`` standard normal draws (`Reasonable Effectiveness of
    Random Weighting: A Litmus Test for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_).

    Only the number of rows ``m`` of its input is used, so it applies to a matrix or to a Gramian.
    One ``torch.randn(m)`` per call, from the global generator of the input's device, in the
    input's dtype (in float32 for float16/bfloat16 inputs).

    >>> import torch
    >>> from torchjd.aggregation import RandomWeighting
    >>> _ = torch.manual_seed(0)
    >>> RandomWeighting()(torch.zeros(2, 3))
    tensor([0.8623, 0.1377])
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        dtype = torch.float32 if stat.dtype in _LOW_PRECISION else stat.dtype
        random_values = torch.randn(m, dtype=dtype, device=stat.device)
        return torch.softmax(random_values, dim=0).to(stat.dtype)


class Random(WeightedAggregator):
    r"""A random positive combination of the rows, with weights drawn by
    :class:`RandomWeighting` at every call (`Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_). Differentiable.

    >>> import torch
    >>> from torchjd.aggregation import Random
    >>> _ = torch.manual_seed(0)
    >>> Random()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([-2.6229,  1.0000,  1.0000])
    """

    def __init__(self) -> None:
        super().__init__(RandomWeighting())
