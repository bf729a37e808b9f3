from __future__ import annotations

import math

from torch import Tensor

from ._utils import PSDMatrix
from ._weighting_bases import GeneralizedWeighting, Weighting


class Flattening(GeneralizedWeighting):
    r"""Applies a Gramian weighting to a generalized Gramian, by flattening it.

    A generalized Gramian of shape ``[m_1, ..., m_k, m_k, ..., m_1]`` (the layout of
    :meth:`torchjd.autogram.Engine.compute_gramian`) is the Gramian of ``M = m_1 · ... · m_k``
    rows; it is reshaped into that ``M x M`` Gramian (rows in row-major order), ``weighting`` is
    applied, and the ``M`` weights are reshaped to ``[m_1, ..., m_k]``. A 0-d generalized Gramian
    is the ``1 x 1`` Gramian of a scalar and gives a 0-d weight.

    :param weighting: The weighting to apply to the flattened Gramian.

    >>> import torch
    >>> from torchjd.aggregation import Flattening, MeanWeighting
    >>> Flattening(MeanWeighting())(torch.ones(2, 3, 3, 2))
    tensor([[0.1667, 0.1667, 0.1667],
            [0.1667, 0.1667, 0.1667]])
    """

    def __init__(self, weighting: Weighting[PSDMatrix]) -> None:
        super().__init__()
        self.weighting = weighting

    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        _check_is_generalized_gramian(generalized_gramian)
        k = generalized_gramian.ndim // 2
        shape = generalized_gramian.shape[:k]
        n_rows = math.prod(shape)
        # The second half of the dimensions is in reverse order; put it back in order.
        order = [*range(k), *reversed(range(k, 2 * k))]
        gramian = generalized_gramian.permute(order).reshape(n_rows, n_rows)
        return self.weighting(gramian).reshape(shape)


def _check_is_generalized_gramian(generalized_gramian: Tensor) -> None:
    shape = generalized_gramian.shape
    k = len(shape) // 2
    if len(shape) % 2 != 0 or tuple(shape[k:]) != tuple(reversed(shape[:k])):
        raise ValueError(
            "Parameter `generalized_gramian` should have a shape of the form "
            "`[m_1, ..., m_k, m_k, ..., m_1]`. Found `generalized_gramian.shape = "
            f"{shape}`."
        )
