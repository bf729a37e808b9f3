"""Jacobian descent with :func:`backward` and :func:`mtl_backward`.

They replace ``loss.backward()`` (or :func:`torch.autograd.backward`) when there are several
objectives: the Jacobian of the objectives with respect to the parameters is aggregated into one
vector by an aggregator from :mod:`torchjd.aggregation` and accumulated into the ``.grad`` fields.
"""

from ._backward import backward
from ._mtl_backward import mtl_backward

__all__ = ["backward", "mtl_backward"]
