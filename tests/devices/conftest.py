"""Fixtures of the device tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """float32 convolutions on CUDA use TF32 by default (10-bit mantissas: errors of about 1e-3,
    beyond the float32 tolerances); the comparisons with the CPU float64 results are about the
    library's numerics, so TF32 is off during these tests (and restored after)."""
    previous = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
