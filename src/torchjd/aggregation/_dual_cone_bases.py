"""What UPGrad and DualProj share: hyper-parameters, validation, the projection, repr/str.

Both are abstract: :class:`~torchjd.aggregation.UPGrad` and
:class:`~torchjd.aggregation.DualProj` (and their weightings) are the final classes.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import cast

from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._dual_cone import SolverName, check_epsilon, check_solver, project_onto_dual_cone
from ._mean import MeanWeighting
from ._non_differentiable import mark_non_differentiable
from ._pref_vector import pref_vector_to_weighting
from ._utils import (
    PSDMatrix,
    check_is_square_matrix,
    in_float32_if_low_precision,
    pref_vector_suffix,
)
from ._weighting_bases import Weighting


class DualConeWeighting(Weighting[PSDMatrix]):
    """Projects some vectors built from the preference weights onto the dual cone of the rows,
    in the metric of the normalised, regularised Gramian, and reduces the projections to weights.
    """

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float = 0.0001,
        reg_eps: float = 0.0001,
        solver: SolverName = "active_set",
    ) -> None:
        super().__init__()
        self._pref_vector = pref_vector
        self.weighting = pref_vector_to_weighting(pref_vector, default=MeanWeighting())
        self.norm_eps = check_epsilon("norm_eps", norm_eps)
        self.reg_eps = check_epsilon("reg_eps", reg_eps)
        self.solver = check_solver(solver)

    @staticmethod
    @abstractmethod
    def _lower_bounds(weights: Tensor) -> Tensor:
        """The vectors ``u`` (rows, ``[k, m]``) to project, from the preference weights."""

    @staticmethod
    @abstractmethod
    def _reduce(projections: Tensor) -> Tensor:
        """The weights (``[m]``) from the projections (``[k, m]``)."""

    @in_float32_if_low_precision
    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        check_is_square_matrix(gramian)
        weights = self.weighting(gramian).to(dtype=gramian.dtype, device=gramian.device)
        projections = project_onto_dual_cone(
            self._lower_bounds(weights), gramian, self.norm_eps, self.reg_eps, self.solver
        )
        return self._reduce(projections)


class DualConeAggregator(GramianWeightedAggregator):
    """The non-differentiable aggregator of a :class:`DualConeWeighting`."""

    def __init__(self, weighting: DualConeWeighting) -> None:
        super().__init__(weighting)
        self._pref_vector = weighting._pref_vector
        mark_non_differentiable(self)

    def __repr__(self) -> str:
        weighting = cast(DualConeWeighting, self.gramian_weighting)
        return (
            f"{self.__class__.__name__}(pref_vector={self._pref_vector!r}, norm_eps="
            f"{weighting.norm_eps}, reg_eps={weighting.reg_eps}, solver={weighting.solver!r})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_suffix(self._pref_vector)}"
