# PLACEHOLDER: to be replaced by the real implementation.
from typing import Any

from torch import nn


class Engine:
    def __init__(self, *modules: nn.Module, batch_dim: int | None) -> None:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError
