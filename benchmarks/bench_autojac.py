"""Time and peak memory of ``torchjd.autojac.backward`` against naive Jacobian descent.

Model: an MLP with about 1M parameters (512 -> 1024 -> 512 -> m), batch of 32, one MSE loss per
output (m = 8 and m = 64 losses). Each measured step is the forward pass plus the backward step;
the peak is the most CPU memory allocated by torch during the step, above the level at its start.

Methods:
- ``sgd``: ``losses.sum().backward()`` (the floor: one backward pass, no Jacobian);
- ``naive-loop``: one ``autograd.grad`` per loss, the rows stacked into the ``m x N`` Jacobian,
  aggregated, the result written into ``.grad``;
- ``naive-vmap``: like 0.8.0, the rows computed at once with ``vmap``, the per-parameter blocks
  concatenated into the Jacobian, aggregated;
- ``autojac``: ``backward(losses, aggregator)`` (for Mean: one weighted backward pass; for
  Gramian-based aggregators: Gramian accumulated block by block, no concatenation);
- ``autojac-hooked``: the same with a forward pre-hook on the aggregator, which makes it receive
  the full Jacobian (the generic path: rows written into one preallocated matrix by hooks);
- ``...-chunk8``: with ``parallel_chunk_size=8`` (Jacobian built 8 rows at a time; m = 64 only).

Aggregators: Mean, MGDA (Gramian-based) and UPGrad when it is implemented.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._measure import format_table, peak_bytes, set_threads
from torchjd.aggregation import MGDA, Aggregator, Mean, UPGrad
from torchjd.autojac import backward

_BATCH = 32
_N_LOSSES = (8, 64)
_REPEATS = 5


def _model(m: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, m)
    )


def _aggregators() -> dict[str, Callable[[], Aggregator]]:
    factories: dict[str, Callable[[], Aggregator]] = {"Mean": Mean, "MGDA": MGDA}
    try:
        UPGrad()(torch.eye(2))
        factories["UPGrad"] = UPGrad
    except NotImplementedError:
        pass  # Not implemented yet in this tree.
    return factories


def _write_grads(params: list[Tensor], vector: Tensor) -> None:
    for param, piece in zip(params, torch.split(vector, [p.numel() for p in params])):
        param.grad = piece.reshape(param.shape).clone()


def _naive_loop(losses: Tensor, params: list[Tensor], aggregator: Aggregator) -> None:
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < losses.shape[0])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    _write_grads(params, aggregator(torch.stack(rows)))


def _naive_vmap(losses: Tensor, params: list[Tensor], aggregator: Aggregator) -> None:
    identity = torch.eye(losses.shape[0], dtype=losses.dtype)
    blocks = torch.autograd.grad(losses, params, identity, is_grads_batched=True)
    matrix = torch.cat([block.reshape(losses.shape[0], -1) for block in blocks], dim=1)
    del blocks
    _write_grads(params, aggregator(matrix))


def _hooked(aggregator: Aggregator) -> Aggregator:
    aggregator.register_forward_pre_hook(lambda _module, _args: None)
    return aggregator


def _step_fn(
    method: str, model: nn.Module, inputs: Tensor, targets: Tensor, make: Callable[[], Aggregator]
) -> Callable[[], None]:
    params = list(model.parameters())
    aggregator = _hooked(make()) if "hooked" in method else make()
    chunk_size = 8 if method.endswith("chunk8") else None

    def step() -> None:
        model.zero_grad(set_to_none=True)
        losses = ((model(inputs) - targets) ** 2).mean(dim=0)
        if method == "sgd":
            losses.sum().backward()
        elif method == "naive-loop":
            _naive_loop(losses, params, aggregator)
        elif method == "naive-vmap":
            _naive_vmap(losses, params, aggregator)
        else:
            backward(losses, aggregator, parallel_chunk_size=chunk_size)

    return step


def _seconds(step: Callable[[], None]) -> tuple[float, float]:
    """Median and minimum wall time over ``_REPEATS`` runs after one warm-up run (the minimum is
    the robust figure on a shared machine)."""
    step()
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _wanted(method: str, aggregator_name: str, m: int) -> bool:
    if not method.endswith("chunk8"):
        return True
    # Chunks only matter with more rows than a chunk, and not for Mean's single weighted pass.
    return m > 8 and not (method == "autojac-chunk8" and aggregator_name == "Mean")


def run() -> list[dict[str, Any]]:
    set_threads()
    rows: list[dict[str, Any]] = []
    methods = (
        "naive-loop",
        "naive-vmap",
        "autojac",
        "autojac-hooked",
        "autojac-chunk8",
        "autojac-hooked-chunk8",
    )
    for m in _N_LOSSES:
        torch.manual_seed(0)
        model = _model(m)
        n_params = sum(p.numel() for p in model.parameters())
        inputs, targets = torch.randn(_BATCH, 512), torch.randn(_BATCH, m)
        jacobian_mb = m * n_params * 4 / 2**20
        cases = [("sgd", "-", Mean)] + [
            (method, name, make)
            for name, make in _aggregators().items()
            for method in methods
            if _wanted(method, name, m)
        ]
        for method, name, make in cases:
            step = _step_fn(method, model, inputs, targets, make)
            median, fastest = _seconds(step)
            peak_mb = peak_bytes(step) / 2**20
            rows.append(
                {
                    "m": m,
                    "params": n_params,
                    "aggregator": name,
                    "method": method,
                    "median_ms": median * 1e3,
                    "min_ms": fastest * 1e3,
                    "peak_MB": peak_mb,
                    "peak/J": peak_mb / jacobian_mb,
                }
            )
            print(format_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
    print()
    print(format_table(rows, list(rows[0])))
    print("(J: the m x N float32 Jacobian; peak/J = peak memory in Jacobians)")
    return rows


if __name__ == "__main__":
    run()
