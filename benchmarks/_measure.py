"""Timing and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

_CPU = torch.device("cpu")


def bench_device() -> torch.device:
    """The device the benchmarks run on: ``TORCHJD_BENCH_DEVICE`` (``cpu`` by default, ``cuda``
    on a machine with a GPU)."""
    return torch.device(os.environ.get("TORCHJD_BENCH_DEVICE", "cpu"))


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU), so that wall times count it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], Any],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device = _CPU,
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs, the work
    queued on ``device`` included."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Any], device: torch.device = _CPU) -> int:
    """Peak of the bytes allocated by torch on ``device`` during ``fn()``, above the level at start.

    On CUDA, from the caching allocator's statistics. On the CPU, by replaying the profiler's raw
    allocation and free events in time order (the per-operator summaries nest, so summing them
    double counts). Tensors that exist before the call (model, data, optimizer state) are not
    counted; run ``fn`` once before, so that one-off allocations are not counted either.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    assert prof.profiler is not None
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    current = 0
    peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Render ``rows`` as an aligned text table with the given ``columns``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    cells = [[cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(value.ljust(width) for value, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def set_threads(threads: int = 2) -> None:
    torch.set_num_threads(threads)
