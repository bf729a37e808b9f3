from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor, nn

_T = TypeVar("_T", contravariant=True)
_FnInput = TypeVar("_FnInput")


class Weighting(Generic[_T], nn.Module, ABC):
    r"""Abstract base class of the maps from a statistic of an ``m x n`` matrix to ``m`` weights.

    The statistic is usually the Gramian of the matrix (``Weighting[PSDMatrix]``) or the matrix
    itself (``Weighting[Matrix]``). Weightings are modules, so hooks registered on them fire.
    ``weighting << fn`` builds the weighting that first applies ``fn`` to its input.

    >>> import torch
    >>> from torchjd.aggregation import MeanWeighting
    >>> MeanWeighting()(torch.eye(4))
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, stat: _T, /) -> Tensor:
        """Compute the weights from the statistic ``stat``."""

    def __call__(self, stat: _T, /) -> Tensor:
        return super().__call__(stat)

    def __lshift__(self, fn: Callable[[_FnInput], _T]) -> Weighting[_FnInput]:
        return _Composition(self, fn)


class _Composition(Weighting[_FnInput]):
    """The weighting ``weighting(fn(x))``."""

    def __init__(self, weighting: Weighting[_T], fn: Callable[[_FnInput], _T]) -> None:
        super().__init__()
        self.fn = fn
        self.weighting = weighting

    def forward(self, stat: _FnInput, /) -> Tensor:
        return self.weighting(self.fn(stat))


class GeneralizedWeighting(nn.Module, ABC):
    r"""Abstract base class of the maps from a generalized Gramian to a tensor of weights.

    A generalized Gramian of shape ``[m_1, ..., m_k, m_k, ..., m_1]`` (as returned by
    :meth:`torchjd.autogram.Engine.compute_gramian`) is mapped to weights of shape
    ``[m_1, ..., m_k]``.
    """

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        """Compute the weights from ``generalized_gramian``."""

    def __call__(self, generalized_gramian: Tensor, /) -> Tensor:
        return super().__call__(generalized_gramian)
