r"""Aggregators and weightings: from a Jacobian (or its Gramian) to one update direction.

An :class:`Aggregator` maps an ``m x n`` matrix (one row per objective) to a vector of length
``n``. Most aggregators only depend on the matrix through its Gramian: their numerical kernel is a
:class:`Weighting` that maps the Gramian to ``m`` weights, usable on its own with the Gramians
computed by :class:`torchjd.autogram.Engine`.

>>> import torch
>>> from torchjd.aggregation import UPGrad, UPGradWeighting
>>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
>>> UPGrad()(J)
tensor([0.2929, 1.9004, 1.9004])
>>> UPGradWeighting()(J @ J.T)
tensor([1.1109, 0.7894])

Generalized Gramians (of tensors of losses of any shape) are handled by
:class:`GeneralizedWeighting`\ s such as :class:`Flattening`:

>>> from torchjd.aggregation import Flattening
>>> Flattening(UPGradWeighting())(torch.ones((2, 3, 3, 2)))
tensor([[0.1667, 0.1667, 0.1667],
        [0.1667, 0.1667, 0.1667]])
"""

from ._aggregator_bases import Aggregator
from ._aligned_mtl import AlignedMTL, AlignedMTLWeighting
from ._cagrad import CAGrad, CAGradWeighting
from ._config import ConFIG
from ._constant import Constant, ConstantWeighting
from ._dualproj import DualProj, DualProjWeighting
from ._flattening import Flattening
from ._graddrop import GradDrop
from ._imtl_g import IMTLG, IMTLGWeighting
from ._krum import Krum, KrumWeighting
from ._mean import Mean, MeanWeighting
from ._mgda import MGDA, MGDAWeighting
from ._nash_mtl import NashMTL
from ._non_differentiable import NonDifferentiableError
from ._pcgrad import PCGrad, PCGradWeighting
from ._random import Random, RandomWeighting
from ._sum import Sum, SumWeighting
from ._trimmed_mean import TrimmedMean
from ._upgrad import UPGrad, UPGradWeighting
from ._weighting_bases import GeneralizedWeighting, Weighting

__all__ = [
    "IMTLG",
    "MGDA",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "ConFIG",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "Flattening",
    "GeneralizedWeighting",
    "GradDrop",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "NashMTL",
    "NonDifferentiableError",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "Weighting",
]
