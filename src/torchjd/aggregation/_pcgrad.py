from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._non_differentiable import mark_non_differentiable
from ._utils import PSDMatrix, in_float32_if_low_precision
from ._weighting_bases import Weighting


class PCGradWeighting(Weighting[PSDMatrix]):
    r"""Weights of PCGrad (`Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_), from the Gramian ``G`` of the rows.

    Each row ``g_i`` is projected, in a random order of the other rows ``g_j``, onto the normal
    plane of every ``g_j`` it conflicts with (negative inner product); the weights are those of the
    **sum** of the projected rows. A zero Gramian gives weights of ``1``.

    Randomness: one ``torch.randperm(m)`` per row, i.e. ``m`` draws per call, from the global CPU
    generator (rows in order). The ``m`` projections are then run together, one vectorised step per
    position in the permutations, on the Gramian's device (the permutations are copied there
    without waiting for the device).

    >>> import torch
    >>> from torchjd.aggregation import PCGradWeighting
    >>> PCGradWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([2.2222, 1.5789])
    """

    @in_float32_if_low_precision
    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        m = gramian.shape[0]
        device = gramian.device
        if m == 0:
            return torch.zeros(0, dtype=gramian.dtype, device=device)
        rows = torch.arange(m, device=device)
        permutations = _to_device(torch.stack([torch.randperm(m) for _ in range(m)]), device)
        diagonal = gramian.diagonal()
        # Row i of `coefficients` expresses the current projection of g_i in the basis of the rows.
        coefficients = torch.eye(m, dtype=gramian.dtype, device=device)
        for position in range(m):
            others = permutations[:, position]  # the row each g_i is projected against now
            inner_products = (gramian.index_select(0, others) * coefficients).sum(dim=1)
            conflicting = (others != rows) & (inner_products < 0)
            # A conflicting g_j has a positive squared norm; the others get a harmless 1.
            safe_squared_norms = torch.where(
                conflicting, diagonal.index_select(0, others), torch.ones_like(inner_products)
            )
            corrections = torch.where(
                conflicting, inner_products / safe_squared_norms, torch.zeros_like(inner_products)
            )
            coefficients = coefficients.scatter_add(1, others.unsqueeze(1), -corrections[:, None])
        return coefficients.sum(dim=0)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        # A copy from pinned memory is asynchronous; from pageable memory it would synchronise.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class PCGrad(GramianWeightedAggregator):
    r"""PCGrad (`Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_):
    the sum of the rows, each projected in random order onto the normal planes of the rows it
    conflicts with. See :class:`PCGradWeighting` for the random draws.

    Raises :class:`~torchjd.aggregation.NonDifferentiableError` if differentiated through.

    >>> import torch
    >>> from torchjd.aggregation import PCGrad
    >>> PCGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5848, 3.8012, 3.8012])
    """

    def __init__(self) -> None:
        super().__init__(PCGradWeighting())
        mark_non_differentiable(self)
