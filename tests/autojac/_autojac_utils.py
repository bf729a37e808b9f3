"""Shared pieces of the autojac tests: local aggregators for each strategy of the engine, a hook
that forces the generic strategy and records what the aggregator receives, and a slow,
obviously-correct reference Jacobian."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from torchjd.aggregation import (
    IMTLG,
    MGDA,
    Aggregator,
    AlignedMTL,
    Constant,
    Krum,
    Mean,
    Sum,
    UPGrad,
    Weighting,
)
from torchjd.aggregation._aggregator_bases import GramianWeightedAggregator


class SolveWeighting(Weighting[Tensor]):
    """A Gramian weighting that depends on every entry of the Gramian: ``(G + I)^{-1} 1``."""

    def forward(self, gramian: Tensor, /) -> Tensor:
        identity = torch.eye(gramian.shape[0], dtype=gramian.dtype)
        ones = torch.ones(gramian.shape[0], dtype=gramian.dtype)
        return torch.linalg.solve(gramian + identity, ones)


class SolveAggregator(GramianWeightedAggregator):
    """A Gramian-based aggregator defined here, independent of the library's methods."""

    def __init__(self) -> None:
        super().__init__(SolveWeighting())


class ColumnMedian(Aggregator):
    """A plain aggregator (no weighting): always goes through the full Jacobian."""

    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.median(dim=0).values


class Recorder:
    """Forward pre-hook recording the matrices an aggregator receives (forces the generic path)."""

    def __init__(self) -> None:
        self.matrices: list[Tensor] = []

    def __call__(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.matrices.append(args[0].clone())


def recorded(aggregator: Aggregator) -> tuple[Aggregator, Recorder]:
    recorder = Recorder()
    aggregator.register_forward_pre_hook(recorder)
    return aggregator, recorder


# Aggregators for each strategy: weighted product (Mean, Sum, Constant), Gramian (UPGrad, MGDA,
# IMTLG, AlignedMTL, Krum, SolveAggregator) and generic (ColumnMedian). They all need m = 5 rows.
AGGREGATOR_FACTORIES: dict[str, Callable[[], Aggregator]] = {
    "Mean": Mean,
    "Sum": Sum,
    "Constant": lambda: Constant(torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5])),
    "UPGrad": UPGrad,
    "MGDA": MGDA,
    "IMTLG": IMTLG,
    "AlignedMTL": AlignedMTL,
    "Krum": lambda: Krum(n_byzantine=1),
    "SolveAggregator": SolveAggregator,
    "ColumnMedian": ColumnMedian,
}
N_ROWS = 5


def reference_jacobian(outputs: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
    """The ``m x N`` Jacobian, one ``autograd.grad`` per row (graph retained)."""
    flat = torch.cat([output.reshape(-1) for output in outputs])
    rows = []
    for i in range(flat.numel()):
        grads = torch.autograd.grad(flat[i], inputs, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros(x.numel(), dtype=flat.dtype) if g is None else g.reshape(-1)
                    for g, x in zip(grads, inputs)
                ]
            )
        )
    return torch.stack(rows)


def split_like(vector: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    pieces = torch.split(vector, [t.numel() for t in tensors])
    return [piece.reshape(t.shape) for piece, t in zip(pieces, tensors)]
