"""Numerical helpers shared by several aggregation methods."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import torch
from torch import Tensor

Matrix = Annotated[Tensor, "2-D tensor: one row per objective"]
PSDMatrix = Annotated[Tensor, "2-D symmetric positive semi-definite tensor (a Gramian)"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

_F = TypeVar("_F", bound=Callable[..., Tensor])


def compute_gramian(matrix: Tensor) -> Tensor:
    """Return ``matrix @ matrix.T``, the Gramian of the rows of ``matrix``."""
    return matrix @ matrix.T


def check_is_square_matrix(gramian: Tensor) -> None:
    """Raise a ``ValueError`` naming ``gramian`` unless it is a square matrix."""
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            "Parameter `gramian` should be a square matrix (a tensor of shape `[m, m]`). Found "
            f"`gramian.shape = {gramian.shape}`."
        )


def normalize(gramian: Tensor, eps: float) -> Tensor:
    """Divide ``gramian`` by its trace, or return zeros when the trace is below ``eps``.

    Stays on the device: the branch is taken with ``torch.where``, not with a host-side test.
    """
    trace = gramian.diagonal().sum()
    small = trace < eps
    safe_trace = torch.where(small, torch.ones_like(trace), trace)
    return torch.where(small, torch.zeros_like(gramian), gramian / safe_trace)


def regularize(gramian: Tensor, eps: float) -> Tensor:
    """Return ``gramian + eps * I``."""
    identity = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    return gramian + eps * identity


def in_float32_if_low_precision(forward: _F) -> _F:
    """Run ``forward(self, tensor, ...)`` in float32 for float16/bfloat16 inputs and cast back.

    Solvers and decompositions are unstable or unimplemented in half precision; the weights are
    small, so computing them in float32 costs nothing.
    """

    @functools.wraps(forward)
    def wrapper(self: Any, tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if tensor.dtype not in _LOW_PRECISION:
            return forward(self, tensor, *args, **kwargs)
        return forward(self, tensor.float(), *args, **kwargs).to(tensor.dtype)

    return wrapper  # type: ignore[return-value]


def format_vector(vector: Tensor) -> str:
    """Render a vector the way aggregators' ``str`` shows it: ``[1., 0.5, 0.33]``."""
    entries = [f"{value:.2f}".rstrip("0") for value in vector.tolist()]
    return "[" + ", ".join(entries) + "]"


def pref_vector_suffix(pref_vector: Tensor | None) -> str:
    """Return ``""`` for no preference vector, else ``"([1., 2.])"``."""
    return "" if pref_vector is None else f"({format_vector(pref_vector)})"
