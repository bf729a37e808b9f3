from __future__ import annotations

from typing import Any

from torch import nn


class NonDifferentiableError(RuntimeError):
    """Raised when autograd tries to differentiate through a non-differentiable aggregator.

    :param module: The aggregator that was differentiated through; its ``str`` is in the message.

    >>> import torch
    >>> from torchjd.aggregation import NonDifferentiableError, UPGrad
    >>> matrix = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], requires_grad=True)
    >>> try:
    ...     UPGrad()(matrix).sum().backward()
    ... except NonDifferentiableError as error:
    ...     print(error)
    Trying to differentiate through UPGrad, which is not differentiable.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(f"Trying to differentiate through {module}, which is not differentiable.")


def raise_non_differentiable_error(module: nn.Module, _grad_output: Any) -> None:
    """Full backward pre-hook that refuses any attempt to differentiate through ``module``."""
    raise NonDifferentiableError(module)


def mark_non_differentiable(module: nn.Module) -> None:
    """Make ``module`` raise :class:`NonDifferentiableError` when autograd goes through it."""
    module.register_full_backward_pre_hook(raise_non_differentiable_error)
