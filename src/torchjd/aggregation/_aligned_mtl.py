# PLACEHOLDER: to be replaced by the real implementation.
from __future__ import annotations

from typing import Any

from torch import Tensor

from ._aggregator_bases import Aggregator
from ._weighting_bases import GeneralizedWeighting, Weighting


class AlignedMTL(Aggregator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: Tensor, /) -> Tensor:
        raise NotImplementedError


class AlignedMTLWeighting(Weighting[Tensor]):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: Tensor, /) -> Tensor:
        raise NotImplementedError
