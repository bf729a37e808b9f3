"""torchjd: Jacobian descent for PyTorch.

- :mod:`torchjd.aggregation`: aggregators and weightings (UPGrad, MGDA, ...).
- :mod:`torchjd.autojac`: :func:`~torchjd.autojac.backward` and
  :func:`~torchjd.autojac.mtl_backward`, drop-in replacements for ``loss.backward()``.
- :mod:`torchjd.autogram`: the :class:`~torchjd.autogram.Engine`, which computes the Gramian of
  the Jacobian without holding the Jacobian.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import aggregation, autogram, autojac

__version__ = "0.8.0"

__all__ = ["__version__", "aggregation", "autogram", "autojac"]

_DEPRECATED_FUNCTIONS = ("backward", "mtl_backward")


def __getattr__(name: str) -> Any:
    # Not cached in the module dict: every access warns, as users of the old path expect.
    if name in _DEPRECATED_FUNCTIONS:
        warnings.warn(
            f"Importing `{name}` from `torchjd` is deprecated. Please import it from `autojac` "
            "instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(autojac, name)
    raise AttributeError(f"module {__name__} has no attribute {name}")
