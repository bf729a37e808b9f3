from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._aggregator_bases import Aggregator
from ._non_differentiable import mark_non_differentiable
from ._utils import Matrix, format_vector, in_float32_if_low_precision


def _identity(p: Tensor) -> Tensor:
    return p


class GradDrop(Aggregator):
    r"""GradDrop (`Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
    <https://arxiv.org/abs/2010.06808>`_): in every column, keep either the positive or the negative
    entries, at random, with a probability that grows with the sign purity of the column.

    For column ``j``, the purity is ``P_j = (1 + Σ_i J_ij / Σ_i |J_ij|) / 2``; with ``U_j`` uniform
    in ``[0, 1)``, the positive entries are kept if ``f(P_j) > U_j`` and the negative ones if
    ``f(P_j) < U_j``. Row ``i`` keeps a fraction ``leak_i`` of its dropped entries. The result is
    the sum of the masked rows. Raises :class:`~torchjd.aggregation.NonDifferentiableError` if
    differentiated through.

    Randomness: one ``torch.rand(n)`` per call (none for an empty matrix), from the global
    generator of the matrix's device, in the matrix's dtype (float32 for float16/bfloat16).

    :param f: The function applied element-wise to the purities (the identity by default).
    :param leak: One leak coefficient per row; ``None`` means zeros.

    >>> import torch
    >>> from torchjd.aggregation import GradDrop
    >>> _ = torch.manual_seed(0)
    >>> GradDrop()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([6., 2., 2.])
    """

    def __init__(
        self, f: Callable[[Tensor], Tensor] = _identity, leak: Tensor | None = None
    ) -> None:
        super().__init__()
        if leak is not None and leak.dim() != 1:
            raise ValueError(
                "Parameter `leak` should be a 1-dimensional tensor. Found `leak.shape = "
                f"{leak.shape}`."
            )
        self.f = f
        self.leak = leak
        mark_non_differentiable(self)

    @in_float32_if_low_precision
    def forward(self, matrix: Matrix, /) -> Tensor:
        self._check_is_matrix(matrix)
        m, n = matrix.shape
        if self.leak is not None and m != len(self.leak):
            raise ValueError(
                f"Parameter `matrix` should be a matrix of exactly {len(self.leak)} rows (i.e. the "
                f"number of leak scalars). Found `matrix` of shape `{matrix.shape}`."
            )
        if m == 0 or n == 0:
            return torch.zeros(n, dtype=matrix.dtype, device=matrix.device)
        if self.leak is None:
            leak = torch.zeros(m, dtype=matrix.dtype, device=matrix.device)
        else:
            leak = self.leak.to(dtype=matrix.dtype, device=matrix.device)

        # All-zero columns get a NaN purity: every comparison below is then false and, with only
        # zero entries, the column contributes nothing, as it should.
        purity = (1 + matrix.sum(dim=0) / matrix.abs().sum(dim=0)) / 2
        transformed_purity = self.f(purity)
        thresholds = torch.rand(n, dtype=matrix.dtype, device=matrix.device)
        keep_positive = transformed_purity > thresholds
        keep_negative = transformed_purity < thresholds
        mask = (keep_positive & (matrix > 0)) | (keep_negative & (matrix < 0))
        leak_column = leak.unsqueeze(1)
        return ((leak_column + (1 - leak_column) * mask) * matrix).sum(dim=0)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(f={self.f!r}, leak={self.leak!r})"

    def __str__(self) -> str:
        suffix = "" if self.leak is None else f"({format_vector(self.leak)})"
        return f"{self.__class__.__name__}{suffix}"
