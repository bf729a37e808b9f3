from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._dual_cone import SolverName, check_epsilon, check_solver, project_onto_dual_cone
from ._mean import MeanWeighting
from ._non_differentiable import mark_non_differentiable
from ._pref_vector import pref_vector_to_weighting
from ._utils import (
    PSDMatrix,
    in_float32_if_low_precision,
    pref_vector_suffix,
)
from ._weighting_bases import Weighting


class UPGradWeighting(Weighting[PSDMatrix]):
    r"""Weights of UPGrad (Unconflicting Projection of Gradients, `Jacobian Descent for
    Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_), from the Gramian ``G`` of
    the rows.

    With ``u`` the preference weights (``1/m`` each by default) and ``G'`` the Gramian divided by
    its trace (or zero if the trace is below ``norm_eps``) plus ``reg_eps`` times the identity,
    each ``u_i e_i`` is projected onto the dual cone: ``v_i`` minimises ``vᵀ G' v`` subject to
    ``v ≥ u_i e_i``, and the weights are ``Σ_i v_i``. Then ``Jᵀ v_i`` is the projection of
    ``u_i g_i`` onto the cone ``{x : J x ≥ 0}``, and the aggregation is the sum of the projected
    rows, which conflicts with none of them. When ``trace(G) < norm_eps``, the weights are the
    non-negative part of ``u``.

    The weights are constants with respect to ``G`` (no gradient flows back). With the default
    solver they are computed on ``G``'s device, in float64; on accelerators, the solver reads one
    boolean back to the host at a few rounds (typically two or three times per call) to know
    when to stop.

    :param pref_vector: The preference weights ``u``; ``None`` means ``1/m`` each.
    :param norm_eps: Gramians with a trace below this are treated as zero.
    :param reg_eps: The multiple of the identity added to the normalised Gramian.
    :param solver: ``"active_set"``: the exact batched solver of this library (all ``m``
        problems at once, on the Gramian's device, see :mod:`torchjd.aggregation._dual_cone`);
        it also handles singular ``G'`` (``reg_eps=0``). ``"quadprog"``: the solver of torchjd
        0.8.0, one problem at a time on the CPU (optional dependency: ``pip install
        "torchjd[quadprog]"``); it needs a positive definite ``G'``.

    >>> import torch
    >>> from torchjd.aggregation import UPGradWeighting
    >>> UPGradWeighting()(torch.tensor([[18.0, -22.0], [-22.0, 38.0]]))
    tensor([1.1109, 0.7894])
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
        lower = torch.diag(weights)
        projections = project_onto_dual_cone(
            lower, gramian, self.norm_eps, self.reg_eps, self.solver
        )
        return projections.sum(dim=0)


def _check_is_square(gramian: Tensor) -> None:
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"Parameter `gramian` should be a square matrix. Found `gramian.shape = "
            f"{gramian.shape}`."
        )


class UPGrad(GramianWeightedAggregator):
    r"""UPGrad (Unconflicting Projection of Gradients, `Jacobian Descent for Multi-Objective
    Optimization <https://arxiv.org/abs/2406.16232>`_): projects each row onto the dual cone of
    all the rows and combines the projections with the preference weights, see
    :class:`UPGradWeighting`. The result conflicts with none of the rows. Not differentiable.

    :param pref_vector: The preference weights; ``None`` means ``1/m`` each (the mean of the
        projected rows).
    :param norm_eps: Jacobians whose squared Frobenius norm is below this are treated as zero.
    :param reg_eps: The regularisation of the normalised Gramian.
    :param solver: ``"active_set"`` (default, this library's exact batched solver) or
        ``"quadprog"`` (torchjd 0.8.0's solver, optional dependency).

    >>> import torch
    >>> from torchjd.aggregation import UPGrad
    >>> UPGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2929, 1.9004, 1.9004])
    """

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float = 0.0001,
        reg_eps: float = 0.0001,
        solver: SolverName = "active_set",
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, norm_eps, reg_eps, solver))
        self._pref_vector = pref_vector
        mark_non_differentiable(self)

    def __repr__(self) -> str:
        weighting = cast(UPGradWeighting, self.gramian_weighting)
        return (
            f"{self.__class__.__name__}(pref_vector={self._pref_vector!r}, norm_eps="
            f"{weighting.norm_eps}, reg_eps={weighting.reg_eps}, solver={weighting.solver!r})"
        )

    def __str__(self) -> str:
        return f"{self.__class__.__name__}{pref_vector_suffix(self._pref_vector)}"
