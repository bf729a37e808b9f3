from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import Aggregator
from ._utils import Matrix, in_float32_if_low_precision


class TrimmedMean(Aggregator):
    r"""Coordinate-wise trimmed mean (`Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates <https://proceedings.mlr.press/v80/yin18a.html>`_): in every column, drop the
    ``trim_number`` smallest and the ``trim_number`` largest values, and average the others.
    Differentiable.

    :param trim_number: The number of values dropped at each end of every column. The matrix must
        have at least ``2 * trim_number + 1`` rows.

    >>> import torch
    >>> from torchjd.aggregation import TrimmedMean
    >>> J = torch.tensor([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])
    >>> TrimmedMean(trim_number=1)(J)
    tensor([1.5000, 2.5000])
    """

    def __init__(self, trim_number: int) -> None:
        super().__init__()
        if trim_number < 0:
            # The unbalanced backticks reproduce the message of the reference implementation.
            raise ValueError(
                "Parameter `trim_number` should be a non-negative integer. Found `trim_number` = "
                f"{trim_number}`."
            )
        self.trim_number = trim_number

    @in_float32_if_low_precision
    def forward(self, matrix: Matrix, /) -> Tensor:
        self._check_is_matrix(matrix)
        m = matrix.shape[0]
        if m < 2 * self.trim_number + 1:
            raise ValueError(
                "Parameter `matrix` should be a matrix of at least "
                f"{2 * self.trim_number + 1} rows (i.e. `2 * trim_number + 1`). Found `matrix` of "
                f"shape `{matrix.shape}`."
            )
        sorted_columns = torch.sort(matrix, dim=0).values
        kept = sorted_columns[self.trim_number : m - self.trim_number]
        return kept.mean(dim=0)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(trim_number={self.trim_number})"

    def __str__(self) -> str:
        return f"TM{self.trim_number}"
