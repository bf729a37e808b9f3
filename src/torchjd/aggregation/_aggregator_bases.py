from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ._utils import Matrix, PSDMatrix, compute_gramian
from ._weighting_bases import Weighting

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Aggregator(nn.Module, ABC):
    r"""Abstract base class of the maps from an ``m x n`` matrix (a Jacobian) to a vector of length
    ``n``.

    Aggregators are modules without parameters: forward hooks and backward hooks registered on
    them fire, which is the way to monitor them.

    >>> import torch
    >>> from torchjd.aggregation import Mean
    >>> Mean()(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor([2., 3.])
    """

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def _check_is_matrix(matrix: Tensor) -> None:
        if matrix.ndim != 2:
            raise ValueError(
                "Parameter `matrix` should be a tensor of dimension 2. Found `matrix.shape = "
                f"{matrix.shape}`."
            )

    @abstractmethod
    def forward(self, matrix: Matrix, /) -> Tensor:
        """Aggregate ``matrix`` into one vector."""

    def __call__(self, matrix: Matrix, /) -> Tensor:
        return super().__call__(matrix)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"

    def __str__(self) -> str:
        return self.__class__.__name__


class WeightedAggregator(Aggregator):
    """An aggregator that returns ``weighting(matrix) @ matrix``.

    :param weighting: The weighting that maps the matrix to one weight per row.
    """

    def __init__(self, weighting: Weighting[Matrix]) -> None:
        super().__init__()
        self.weighting = weighting

    @staticmethod
    def combine(matrix: Matrix, weights: Tensor) -> Tensor:
        """Return the combination ``weights @ matrix`` of the rows of ``matrix``."""
        return weights.to(dtype=matrix.dtype, device=matrix.device) @ matrix

    def forward(self, matrix: Matrix, /) -> Tensor:
        self._check_is_matrix(matrix)
        weights = self.weighting(matrix)
        return self.combine(matrix, weights)


def _gramian_of_rows(matrix: Matrix) -> PSDMatrix:
    # Half-precision Gramians lose most of their digits; the weightings need them.
    if matrix.dtype in _LOW_PRECISION:
        matrix = matrix.float()
    return compute_gramian(matrix)


class GramianWeightedAggregator(WeightedAggregator):
    """An aggregator whose weights depend on the matrix only through its Gramian.

    Its ``weighting`` attribute is ``gramian_weighting << compute_gramian``, so that
    ``aggregator.weighting(matrix)`` returns the weights of ``matrix``; ``gramian_weighting`` is
    the numerical kernel of the method.

    :param gramian_weighting: The weighting that maps the Gramian to one weight per row.
    """

    def __init__(self, gramian_weighting: Weighting[PSDMatrix]) -> None:
        super().__init__(gramian_weighting << _gramian_of_rows)

    @property
    def gramian_weighting(self) -> Weighting[PSDMatrix]:
        """The Gramian-based weighting wrapped by this aggregator."""
        composition = self.weighting
        return composition.weighting  # type: ignore[return-value]
