from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._mean import MeanWeighting
from ._pref_vector import pref_vector_to_weighting
from ._utils import PSDMatrix, in_float32_if_low_precision, pref_vector_suffix
from ._weighting_bases import Weighting


class AlignedMTLWeighting(Weighting[PSDMatrix]):
    r"""Weights of Aligned-MTL (`Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_), from the Gramian ``G`` of the rows.

    The preference weights ``w`` (``1/m`` each by default) are mapped to ``B w``, where the balance
    matrix ``B = sqrt(λ_R) V Σ⁻¹ Vᵀ`` comes from the eigen-decomposition of ``G`` restricted to its
    ``R`` eigenvalues above ``max(λ) · m · eps`` (``λ_R`` the smallest of them, ``Σ`` the
    diagonal of their square roots). The rows of ``B J`` are orthogonal with equal norms on the
    range of ``J``. ``B = I`` for a zero Gramian. ``eps`` is the machine epsilon of the *default*
    dtype (``torch.finfo()``), whatever the Gramian's dtype, as in the reference implementation.

    The rank is used through masks, not as a Python int; the only host synchronisation is the
    one :func:`torch.linalg.eigh` makes on CUDA to check its convergence.
    The weights are differentiable through :func:`torch.linalg.eigh`, whose gradient is undefined
    (NaN) when ``G`` has repeated eigenvalues (e.g. a zero Gramian).

    :param pref_vector: The preference weights ``w``; ``None`` means ``1/m`` each.

    >>> import torch
    >>> from torchjd.aggregation import AlignedMTLWeighting
    >>> AlignedMTLWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([0.5591, 0.4083])
    """

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__()
        self._pref_vector = pref_vector
        self.weighting = pref_vector_to_weighting(pref_vector, default=MeanWeighting())

    @in_float32_if_low_precision
    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        weights = self.weighting(gramian).to(dtype=gramian.dtype, device=gramian.device)
        return _balance_matrix(gramian) @ weights


def _balance_matrix(gramian: PSDMatrix) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(gramian, UPLO="U")
    m = gramian.shape[0]
    tolerance = eigenvalues.max() * m * torch.finfo().eps
    kept = eigenvalues > tolerance
    any_kept = kept.any()
    # Discarded eigenvalues are replaced by 1 before being inverted so that neither the result nor
    # its gradient see an infinity.
    safe_eigenvalues = torch.where(kept, eigenvalues, torch.ones_like(eigenvalues))
    inverse_sqrt = torch.where(kept, safe_eigenvalues.rsqrt(), torch.zeros_like(eigenvalues))
    inf = torch.full_like(eigenvalues, float("inf"))
    smallest_kept = torch.where(kept, eigenvalues, inf).min()
    smallest_kept = torch.where(any_kept, smallest_kept, torch.ones_like(smallest_kept))
    balance = smallest_kept.sqrt() * (eigenvectors * inverse_sqrt) @ eigenvectors.T
    identity = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    return torch.where(any_kept, balance, identity)


class AlignedMTL(GramianWeightedAggregator):
    r"""Aligned-MTL (`Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_): combines the rows after aligning them, see
    :class:`AlignedMTLWeighting`. Differentiable (through the eigen-decomposition).

    :param pref_vector: The preference weights of the aligned rows; ``None`` means ``1/m`` each.

    >>> import torch
    >>> from torchjd.aggregation import AlignedMTL
    >>> AlignedMTL()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2133, 0.9673, 0.9673])
    """

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__(AlignedMTLWeighting(pref_vector))
        self._pref_vector = pref_vector

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(pref_vector={self._pref_vector!r})"

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_suffix(self._pref_vector)}"
