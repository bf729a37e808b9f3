from __future__ import annotations

from torch import Tensor

from ._aggregator_bases import WeightedAggregator
from ._utils import Matrix, format_vector
from ._weighting_bases import Weighting


class ConstantWeighting(Weighting[Matrix]):
    """Always returns the same weights, whatever the matrix (or Gramian) it receives.

    :param weights: One weight per row of the matrices this weighting will be applied to.

    >>> import torch
    >>> from torchjd.aggregation import ConstantWeighting
    >>> ConstantWeighting(torch.tensor([1.0, 2.0]))(torch.zeros(2, 5))
    tensor([1., 2.])
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        if weights.dim() != 1:
            raise ValueError(
                "Parameter `weights` should be a 1-dimensional tensor. Found `weights.shape = "
                f"{weights.shape}`."
            )
        self.weights = weights

    def forward(self, matrix: Tensor, /) -> Tensor:
        if matrix.shape[0] != len(self.weights):
            raise ValueError(
                f"Parameter `matrix` should have {len(self.weights)} rows (the number of specified "
                f"weights). Found `matrix` with {matrix.shape[0]} rows."
            )
        return self.weights


class Constant(WeightedAggregator):
    """Combines the rows of the matrix with fixed weights.

    :param weights: One weight per row of the matrices to aggregate.

    >>> import torch
    >>> from torchjd.aggregation import Constant
    >>> Constant(torch.tensor([1.0, 2.0]))(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([8., 3., 3.])
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))
        self._weights = weights

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weights={self._weights!r})"

    def __str__(self) -> str:
        return f"{self.__class__.__name__}({format_vector(self._weights)})"
