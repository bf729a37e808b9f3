from __future__ import annotations

from torch import Tensor

from ._dual_cone import SolverName
from ._dual_cone_bases import DualConeAggregator, DualConeWeighting


class DualProjWeighting(DualConeWeighting):
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

    @staticmethod
    def _lower_bounds(weights: Tensor) -> Tensor:
        return weights.unsqueeze(0)

    @staticmethod
    def _reduce(projections: Tensor) -> Tensor:
        return projections[0]


class DualProj(DualConeAggregator):
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
