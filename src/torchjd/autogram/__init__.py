"""The autogram engine: the Gramian of the Jacobian without ever holding the Jacobian.

Weightings compatible with autogram (they take a Gramian): UPGradWeighting, AlignedMTLWeighting,
CAGradWeighting, ConstantWeighting, DualProjWeighting, IMTLGWeighting, KrumWeighting,
MeanWeighting, MGDAWeighting, PCGradWeighting, RandomWeighting, SumWeighting. For generalized
Gramians, wrap one of them in :class:`torchjd.aggregation.Flattening`.
"""

from ._engine import Engine

__all__ = ["Engine"]
