"""Shared pieces of the device tests: the devices, tolerances and a host-synchronisation counter.

Every test of this package runs on the CPU (where it checks its own logic against the CPU float64
reference) and, when a GPU is available, on CUDA too; nothing is skipped on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Relative tolerances (to the natural scale of the compared quantity) of a result computed in this
# dtype, on any device, against the CPU float64 reference.
RTOL = {torch.float64: 1e-7, torch.float32: 2e-4}


def assert_close_to(
    actual: Tensor, expected: Tensor, *, rtol: float, scale: float | None = None
) -> None:
    """``|actual - expected| <= rtol * scale`` entry-wise, after moving ``actual`` to the CPU in
    float64; ``scale`` defaults to ``max|expected|`` (at least 1e-30, so that zeros compare)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    tolerance = rtol * max(scale, 1e-30)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tolerance, (
        f"max error {error:.3g} > tolerance {tolerance:.3g}\nactual={actual}\nexpected={expected}"
    )


def assert_on(tensor: Tensor, device: str, dtype: torch.dtype) -> None:
    assert tensor.device.type == torch.device(device).type, f"on {tensor.device}, not {device}"
    assert tensor.dtype == dtype, f"dtype {tensor.dtype}, not {dtype}"


@dataclass
class SyncCount:
    """The host synchronisations that CUDA's sync debug mode reported (always 0 off CUDA)."""

    count: int = 0
    messages: list[str] = field(default_factory=list)


@contextmanager
def count_host_syncs(device: str) -> Iterator[SyncCount]:
    """Count the synchronising CUDA operations run in the block, with
    ``torch.cuda.set_sync_debug_mode("warn")`` (the previous mode is restored after). Off CUDA,
    the block just runs and the count stays 0."""
    result = SyncCount()
    if torch.device(device).type != "cuda":
        yield result
        return
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield result
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    result.messages = [
        str(warning.message) for warning in caught if "synchroniz" in str(warning.message).lower()
    ]
    result.count = len(result.messages)
