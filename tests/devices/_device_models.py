"""Small models for the device tests, built on the CPU in float64 from a fixed seed, and the plain
autograd references (Jacobian row by row) that the engines' results are compared with."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ModelCase:
    """A model, its inputs (CPU) and the forward pass giving one loss per sample."""

    model: nn.Module
    inputs: tuple[Tensor, ...]
    losses: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]

    def on(self, device: str, dtype: torch.dtype) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """A copy of the model and of the inputs on ``device``, in ``dtype`` (ids stay ints)."""
        model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        inputs = tuple(
            x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
            for x in self.inputs
        )
        return model, inputs


def _squared_norms(outputs: Tensor) -> Tensor:
    return outputs.square().flatten(start_dim=1).sum(dim=1)


def _mlp() -> ModelCase:
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    inputs = (torch.randn(6, 5), torch.randn(6, 3))
    return ModelCase(model, inputs, lambda m, x: _squared_norms(m(x[0]) - x[1]))


def _cnn() -> ModelCase:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 2),
    )
    return ModelCase(model, (torch.randn(4, 2, 6, 6),), lambda m, x: _squared_norms(m(x[0])))


def _transformer() -> ModelCase:
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return ModelCase(model, (torch.randn(3, 5, 8),), lambda m, x: _squared_norms(m(x[0])))


class _Bag(nn.Module):
    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embedding(tokens).mean(dim=1))


def _embedding(
    vocabulary: int, samples: int, length: int, distinct: int
) -> Callable[[], ModelCase]:
    """``distinct`` ids are used (out of ``vocabulary``), so that tokens repeat."""

    def build() -> ModelCase:
        tokens = torch.randint(0, distinct, (samples, length))
        return ModelCase(_Bag(vocabulary), (tokens,), lambda m, x: _squared_norms(m(x[0])))

    return build


# With these sizes, the embedding rule picks its ghost or vocabulary form (short sequences) and
# its pair form (long sequences, large vocabulary); `test_device_syncs.py` checks which.
EMBEDDING_SHORT = "embedding_short"
EMBEDDING_PAIRS = "embedding_pairs"

_BUILDERS: dict[str, Callable[[], ModelCase]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "transformer": _transformer,
    EMBEDDING_SHORT: _embedding(vocabulary=30, samples=5, length=3, distinct=10),
    EMBEDDING_PAIRS: _embedding(vocabulary=10_000, samples=4, length=64, distinct=50),
}
MODEL_NAMES = list(_BUILDERS)


def build(name: str) -> ModelCase:
    """The model ``name``, in float64, with parameters and inputs drawn from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        case = _BUILDERS[name]()
    case.model.to(torch.float64)
    case.inputs = tuple(x.double() if x.is_floating_point() else x for x in case.inputs)
    return case


def reference_jacobian(output: Tensor, params: Sequence[Tensor]) -> Tensor:
    """The Jacobian of the vector ``output`` w.r.t. ``params`` (flattened, concatenated), row by
    row with plain autograd."""
    rows = []
    for entry in output:
        grads = torch.autograd.grad(entry, params, retain_graph=True, materialize_grads=True)
        rows.append(torch.cat([grad.reshape(-1) for grad in grads]))
    return torch.stack(rows)


def split_like(vector: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``vector`` cut into pieces of the shapes of ``params``."""
    sizes = [param.numel() for param in params]
    return [piece.reshape(param.shape) for piece, param in zip(vector.split(sizes), params)]
