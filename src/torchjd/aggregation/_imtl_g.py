from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._non_differentiable import mark_non_differentiable
from ._utils import PSDMatrix, in_float32_if_low_precision
from ._weighting_bases import Weighting

_SUM_EPS = 1e-12


class IMTLGWeighting(Weighting[PSDMatrix]):
    r"""Weights of IMTL-G (`Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_), from the Gramian ``G`` of the rows.

    With ``d`` the vector of row norms (``sqrt(diag(G))``), the weights are ``v / sum(v)`` where
    ``v = pinv(G) d``: for linearly independent rows, the combination then has the same projection
    on every unit-norm row. Linearly dependent rows are handled by the pseudo-inverse. When
    ``|sum(v)| · sqrt(trace(G)) < 1e-12`` (e.g. a zero Gramian) the weights are zeros. (The
    reference implementation compared ``|sum(v)|`` itself with ``1e-12``; as ``v`` scales like
    ``1 / ‖J‖``, that silently zeroed the weights of every Jacobian of norm above about ``1e12``.
    Multiplying by ``‖J‖_F = sqrt(trace(G))`` makes the test independent of the scale.)
    The only host synchronisation is the one :func:`torch.linalg.pinv` makes on CUDA.

    >>> import torch
    >>> from torchjd.aggregation import IMTLGWeighting
    >>> IMTLGWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([0.5923, 0.4077])
    """

    @in_float32_if_low_precision
    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        # The diagonal of a Gramian is non-negative; clamping only removes round-off.
        norms = gramian.diagonal().clamp(min=0).sqrt()
        unnormalized = torch.linalg.pinv(gramian) @ norms
        total = unnormalized.sum()
        negligible = total.abs() * norms.square().sum().sqrt() < _SUM_EPS
        safe_total = torch.where(negligible, torch.ones_like(total), total)
        return torch.where(negligible, torch.zeros_like(unnormalized), unnormalized / safe_total)


class IMTLG(GramianWeightedAggregator):
    r"""IMTL-G (`Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_): the combination of the rows whose projections
    on all unit-norm rows are equal, see :class:`IMTLGWeighting`.

    Raises :class:`~torchjd.aggregation.NonDifferentiableError` if differentiated through.

    >>> import torch
    >>> from torchjd.aggregation import IMTLG
    >>> IMTLG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0767, 1.0000, 1.0000])
    """

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
        mark_non_differentiable(self)
