from __future__ import annotations

from typing import cast

from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._dual_cone import SolverName, check_epsilon, check_solver, project_onto_dual_cone
from ._mean import MeanWeighting
from ._non_differentiable import mark_non_differentiable
from ._pref_vector import pref_vector_to_weighting
from ._upgrad import _check_is_square
from ._utils import (
    PSDMatrix,
    in_float32_if_low_precision,
    pref_vector_suffix,
)
from ._weighting_bases import Weighting


class DualProjWeighting(Weighting[PSDMatrix]):
    r"""Weights of DualProj (the projection of GEM, `Gradient Episodic Memory for Continual
    Learning <https://arxiv.org/abs/1706.08840>`_, Eq. 11), from the Gramian ``G`` of the rows.

    With ``u`` the preference weights (``1/m`` each by default) and ``G'`` the Gramian divided by
    its trace (or zero if the trace is below ``norm_eps``) plus ``reg_eps`` times the identity, the
    weights ``v`` minimise ``vᵀ G' v`` subject to ``v ≥ u``: ``Jᵀ v`` is the projection of
    ``Jᵀ u`` (by default the mean row) onto the cone ``{x : J x ≥ 0}``. When
    ``trace(G) < norm_eps``, the weights are the non-negative part of ``u``.

    The weights are constants with respect to ``G`` (no gradient flows back). With the default
    solver they are computed on ``G``'s device, in float64; on accelerators, the solver reads one
    boolean back to the host at a few rounds (typically two or three times per call) to know
    when to stop.

    :param pref_vector: The preference weights ``u``; ``None`` means ``1/m`` each.
    :param norm_eps: Gramians with a trace below this are treated as zero.
    :param reg_eps: The multiple of the identity added to the normalised Gramian.
    :param solver: ``"active_set"`` (default, this library's exact solver, on the Gramian's
        device, which also handles singular ``G'``) or ``"quadprog"`` (torchjd 0.8.0's solver, on
        the CPU; optional dependency: ``pip install "torchjd[quadprog]"``).

    >>> import torch
    >>> from torchjd.aggregation import DualProjWeighting
    >>> DualProjWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([0.6109, 0.5000])
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

    @in_float32_if_low_precision
    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        _check_is_square(gramian)
        weights = self.weighting(gramian).to(dtype=gramian.dtype, device=gramian.device)
        projections = project_onto_dual_cone(
            weights.unsqueeze(0), gramian, self.norm_eps, self.reg_eps, self.solver
        )
        return projections[0]


class DualProj(GramianWeightedAggregator):
    r"""DualProj: projects the preference-weighted combination of the rows (by default their mean)
    onto the dual cone of the rows, see :class:`DualProjWeighting`. The result conflicts with none
    of the rows. Not differentiable.

    :param pref_vector: The preference weights; ``None`` means ``1/m`` each.
    :param norm_eps: Jacobians whose squared Frobenius norm is below this are treated as zero.
    :param reg_eps: The regularisation of the normalised Gramian.
    :param solver: ``"active_set"`` (default, this library's exact solver) or ``"quadprog"``
        (torchjd 0.8.0's solver, optional dependency).

    >>> import torch
    >>> from torchjd.aggregation import DualProj
    >>> DualProj()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5563, 1.1109, 1.1109])
    """

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float = 0.0001,
        reg_eps: float = 0.0001,
        solver: SolverName = "active_set",
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, norm_eps, reg_eps, solver))
        self._pref_vector = pref_vector
        mark_non_differentiable(self)

    def __repr__(self) -> str:
        weighting = cast(DualProjWeighting, self.gramian_weighting)
        return (
            f"{self.__class__.__name__}(pref_vector={self._pref_vector!r}, norm_eps="
            f"{weighting.norm_eps}, reg_eps={weighting.reg_eps}, solver={weighting.solver!r})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_suffix(self._pref_vector)}"
