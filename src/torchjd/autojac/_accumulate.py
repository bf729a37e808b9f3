"""Accumulation of computed gradients into the ``.grad`` fields, like ``loss.backward()``."""

from __future__ import annotations

import torch
from torch import Tensor

_NOT_POPULATABLE = (
    "Cannot populate the .grad field of a Tensor that does not satisfy:"
    "`tensor.requires_grad and (tensor.is_leaf or tensor.retains_grad)`."
)


def accumulate_grad(tensor: Tensor, grad: Tensor, *, owned: bool = False) -> None:
    """Add ``grad`` to ``tensor.grad``: in place when it exists (the ``.grad`` object is kept),
    else store a copy of ``grad``.

    :param tensor: The tensor whose ``.grad`` receives the gradient.
    :param grad: A gradient of the shape of ``tensor``.
    :param owned: Whether ``grad`` is a fresh tensor that nothing else refers to; it is then
        stored as is instead of being copied.
    """
    if not (tensor.requires_grad and (tensor.is_leaf or tensor.retains_grad)):
        raise ValueError(_NOT_POPULATABLE)
    if grad.dtype != tensor.dtype or grad.device != tensor.device:
        # Inputs of mixed dtypes share one promoted Jacobian; each .grad keeps its input's dtype.
        grad = grad.to(dtype=tensor.dtype, device=tensor.device)
        owned = True
    if grad.shape != tensor.shape:
        grad = grad.reshape(tensor.shape)
    with torch.no_grad():
        if tensor.grad is None:
            tensor.grad = grad if owned else grad.clone()
        else:
            tensor.grad += grad
