from __future__ import annotations

from torch import Tensor

from ._constant import ConstantWeighting
from ._utils import Matrix
from ._weighting_bases import Weighting


def check_pref_vector(pref_vector: Tensor | None) -> None:
    if pref_vector is not None and pref_vector.ndim != 1:
        raise ValueError(
            "Parameter `pref_vector` must be a vector (1D Tensor). Found `pref_vector.ndim = "
            f"{pref_vector.ndim}`."
        )


def pref_vector_to_weighting(
    pref_vector: Tensor | None, default: Weighting[Matrix]
) -> Weighting[Matrix]:
    """Return ``default`` when there is no preference vector, else a constant weighting of it."""
    check_pref_vector(pref_vector)
    if pref_vector is None:
        return default
    return ConstantWeighting(pref_vector)
