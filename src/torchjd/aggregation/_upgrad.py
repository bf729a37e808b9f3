from __future__ import annotations

import torch
from torch import Tensor

from ._dual_cone import SolverName
from ._dual_cone_bases import DualConeAggregator, DualConeWeighting


class UPGradWeighting(DualConeWeighting):
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

    @staticmethod
    def _lower_bounds(weights: Tensor) -> Tensor:
        return torch.diag(weights)

    @staticmethod
    def _reduce(projections: Tensor) -> Tensor:
        return projections.sum(dim=0)


class UPGrad(DualConeAggregator):
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
