"""The optional quadprog backend of the dual-cone projection (``solver="quadprog"``).

It solves the problems one at a time on the CPU, in float64, with the dual active-set method of
Goldfarb and Idnani as implemented by the ``quadprog`` package: the way torchjd 0.8.0 computed
them, hence bit-for-bit parity with its results. It moves the data to the host (a synchronisation
on accelerators) and costs ``O(m³)`` per problem.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch
from torch import Tensor

_INSTALL_HINT = 'pip install "torchjd[quadprog]"'


def check_quadprog_available() -> None:
    """Raise an ``ImportError`` saying how to install ``quadprog`` if it is not installed."""
    if importlib.util.find_spec("quadprog") is None:
        raise ImportError(_missing_message())


def _missing_message() -> str:
    return (
        "The solver 'quadprog' needs the optional dependency `quadprog`, which is not installed. "
        f"Install it with `{_INSTALL_HINT}`, or use the default solver 'active_set'."
    )


def _import_quadprog() -> ModuleType:
    try:
        return importlib.import_module("quadprog")
    except ImportError as error:
        raise ImportError(_missing_message()) from error


def project_weights_quadprog(weights: Tensor, gramian: Tensor) -> Tensor:
    """Same contract as :func:`torchjd.aggregation._dual_cone.project_weights`, computed with
    ``quadprog.solve_qp`` for each vector ``u`` along the last dimension of ``weights``: minimise
    ``½ vᵀ G v`` subject to ``I v ≥ u``.

    :raises ValueError: If ``G`` is not positive definite (quadprog needs a strictly convex
        problem; use ``reg_eps > 0``).
    """
    quadprog = _import_quadprog()
    import numpy as np

    m = gramian.shape[0]
    if gramian.shape != (m, m) or weights.ndim == 0 or weights.shape[-1] != m:
        raise ValueError(
            "Parameter `weights` should have a last dimension of the size of the square matrix "
            f"`gramian`. Found `weights.shape = {weights.shape}` and `gramian.shape = "
            f"{gramian.shape}`."
        )
    matrix = gramian.detach().cpu().to(torch.float64).numpy()
    lower_bounds = weights.detach().cpu().to(torch.float64).reshape(-1, m).numpy()
    linear = np.zeros(m)
    constraints = np.eye(m)
    solutions = np.zeros_like(lower_bounds)
    for index, lower in enumerate(lower_bounds):
        try:
            solutions[index] = quadprog.solve_qp(matrix, linear, constraints, lower, 0)[0]
        except ValueError as error:
            raise ValueError(
                f"quadprog could not solve the projection onto the dual cone ({error}). It needs a "
                "positive definite Gramian: use `reg_eps > 0`, or the default solver "
                "'active_set', which also handles singular Gramians."
            ) from error
    result = torch.from_numpy(solutions).reshape(weights.shape)
    return result.to(device=weights.device, dtype=weights.dtype)
