from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import Aggregator
from ._non_differentiable import mark_non_differentiable
from ._pref_vector import pref_vector_to_weighting
from ._sum import SumWeighting
from ._utils import Matrix, in_float32_if_low_precision, pref_vector_suffix


class ConFIG(Aggregator):
    r"""ConFIG (`ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks
    <https://arxiv.org/abs/2408.11104>`_): a direction with the prescribed cosine similarities
    with the rows, scaled by the sum of the projections of the rows onto it.

    With ``Û`` the matrix of unit-norm rows (zero rows stay zero) and ``w`` the preference weights
    (``1`` each by default), the direction is ``û = d / ‖d‖`` with ``d = pinv(Û) w``, and the
    result is ``(Σ_i g_iᵀ û) û``. Raises :class:`~torchjd.aggregation.NonDifferentiableError` if
    differentiated through. The only host synchronisation is the one :func:`torch.linalg.pinv`
    makes on CUDA.

    The reference implementation did not check the number of dimensions of its input; this one
    raises (``IndexError`` below 2 dimensions, ``RuntimeError`` above, the error types that the
    reference raised in most such cases) rather than risk a meaningless result.

    :param pref_vector: The preference weights ``w``; ``None`` means ``1`` each.

    >>> import torch
    >>> from torchjd.aggregation import ConFIG
    >>> ConFIG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1588, 2.0706, 2.0706])
    """

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__()
        self._pref_vector = pref_vector
        self.weighting = pref_vector_to_weighting(pref_vector, default=SumWeighting())
        mark_non_differentiable(self)

    @in_float32_if_low_precision
    def forward(self, matrix: Matrix, /) -> Tensor:
        _check_has_two_dimensions(matrix)
        weights = self.weighting(matrix).to(dtype=matrix.dtype, device=matrix.device)
        row_norms = torch.linalg.vector_norm(matrix, dim=1, keepdim=True)
        unit_rows = torch.nan_to_num(matrix / row_norms, nan=0.0)
        direction = torch.linalg.pinv(unit_rows) @ weights
        unit_direction = torch.nn.functional.normalize(direction, dim=0)
        length = (matrix @ unit_direction).sum()
        return length * unit_direction

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(pref_vector={self._pref_vector!r})"

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_suffix(self._pref_vector)}"


def _check_has_two_dimensions(matrix: Tensor) -> None:
    if matrix.ndim == 2:
        return
    message = (
        "Parameter `matrix` should be a tensor of dimension 2. Found `matrix.shape = "
        f"{matrix.shape}`."
    )
    if matrix.ndim < 2:
        raise IndexError(message)
    raise RuntimeError(message)
