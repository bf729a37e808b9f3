"""Cost of a Jacobian-descent step relative to a plain SGD step, on the issue's model zoo.

For each model and batch size, in one process: median wall time and peak memory of
- ``sgd``: ``losses.mean().backward()`` then ``optimizer.step()``, on a copy of the model that no
  engine hooks (plain PyTorch),
- ``autojac``: ``torchjd.autojac.backward(losses, UPGrad())`` (when the Jacobian fits in memory),
- ``loop``: the 0.8.0 loop ``engine.compute_gramian`` + ``weighting`` + ``losses.backward(w)``,
- ``fused``: ``engine.backward(losses, weighting)`` (Gramian, weights and ``.grad`` in one pass),
each including the forward pass and the optimizer step, and their ratios to ``sgd``. ``loop`` and
``fused`` run with ``UPGradWeighting`` (``[UPGrad]`` columns, which include its solver) and with
``MeanWeighting`` (``[Mean]``: the engine's own cost, the solver's being almost nil).

Times are medians over rounds in which every step runs once (interleaved, so that a change of the
machine's load hits all steps alike). The peak memory is the most CPU memory allocated by torch
during one step above the level at its start, with the gradients set to ``None`` before the step
(``optimizer.zero_grad()`` outside the measured region, so that freeing the previous gradients does
not count). Run: ``python -m benchmarks bench_autogram`` (``make bench`` runs every suite).
``TORCHJD_BENCH_DEVICE=cuda`` runs it on a GPU (times then include the queued work; memory is
the CUDA caching allocator's peak). Two threads by default, ``TORCHJD_BENCH_THREADS=1`` for one:
on a loaded machine, a second thread that the OS deschedules makes every parallel region wait,
and times then measure the scheduler.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._measure import bench_device, format_table, peak_bytes, set_threads, synchronize
from torchjd.aggregation import (
    Flattening,
    GeneralizedWeighting,
    MeanWeighting,
    UPGrad,
    UPGradWeighting,
    Weighting,
)
from torchjd.autogram import Engine
from torchjd.autojac import backward

_MAX_JACOBIAN_BYTES = 4e8
_ROUNDS = 10
_WARMUP_ROUNDS = 2


@dataclass
class Setting:
    name: str
    batch_size: int
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int], tuple[Tensor, Tensor]]
    losses_of: Callable[[nn.Module, Tensor, Tensor], Tensor]


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


class _TransformerClassifier(nn.Module):
    def __init__(self, d_model: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class _EmbeddingClassifier(nn.Module):
    def __init__(self, vocabulary: int = 10_000, dim: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, dim)
        self.head = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embedding(tokens).mean(dim=1))


class _ThreeHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())
        self.heads = nn.Linear(256, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.trunk(x))


def _classification_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _regression_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y) ** 2


def _images(b: int) -> tuple[Tensor, Tensor]:
    return torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,))


def _settings() -> list[Setting]:
    settings = [
        Setting(
            "mlp",
            b,
            _mlp,
            lambda b: (torch.randn(b, 784), torch.randint(0, 10, (b,))),
            _classification_losses,
        )
        for b in (32, 128, 512)
    ]
    settings += [Setting("cnn", b, _cnn, _images, _classification_losses) for b in (32, 128)]
    settings.append(
        Setting(
            "transformer",
            32,
            _TransformerClassifier,
            lambda b: (torch.randn(b, 64, 128), torch.randint(0, 10, (b,))),
            _classification_losses,
        )
    )
    settings.append(
        Setting(
            "embedding",
            128,
            _EmbeddingClassifier,
            lambda b: (torch.randint(0, 10_000, (b, 32)), torch.randint(0, 10, (b,))),
            _classification_losses,
        )
    )
    settings.append(
        Setting(
            "iwmtl[B,3]",
            128,
            _ThreeHeads,
            lambda b: (torch.randn(b, 784), torch.randn(b, 3)),
            _regression_losses,
        )
    )
    return settings


def _upgrad_is_implemented() -> bool:
    try:
        UPGradWeighting()(torch.eye(2))
    except NotImplementedError:
        return False
    return True


@dataclass
class _Step:
    """A measured step (``run``) and what resets the state before it (``reset``)."""

    run: Callable[[], Any]
    reset: Callable[[], Any]


def _steps(setting: Setting, with_upgrad: bool) -> dict[str, _Step]:
    torch.manual_seed(0)
    device = bench_device()
    model = setting.make_model().to(device)
    plain_model = copy.deepcopy(model)  # before the engine hooks `model`
    x, y = (tensor.to(device) for tensor in setting.make_batch(setting.batch_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
    engine = Engine(model, batch_dim=0)
    vector = setting.name[:5] != "iwmtl"

    def fit(weighting: Weighting[Tensor]) -> Weighting[Tensor] | GeneralizedWeighting:
        return weighting if vector else Flattening(weighting)

    def sgd() -> None:
        setting.losses_of(plain_model, x, y).mean().backward()
        plain_optimizer.step()

    def autojac() -> None:
        backward(setting.losses_of(model, x, y).reshape(-1), UPGrad())
        optimizer.step()

    def make_loop(weighting: Weighting[Tensor] | GeneralizedWeighting) -> Callable[[], None]:
        def loop() -> None:
            losses = setting.losses_of(model, x, y)
            losses.backward(weighting(engine.compute_gramian(losses)))
            optimizer.step()

        return loop

    def make_fused(weighting: Weighting[Tensor] | GeneralizedWeighting) -> Callable[[], None]:
        def fused() -> None:
            engine.backward(setting.losses_of(model, x, y), weighting)
            optimizer.step()

        return fused

    def zero_plain() -> None:
        plain_optimizer.zero_grad(set_to_none=True)

    def zero() -> None:
        optimizer.zero_grad(set_to_none=True)

    steps = {"sgd": _Step(sgd, zero_plain)}
    if with_upgrad:
        steps["fused[UPGrad]"] = _Step(make_fused(fit(UPGradWeighting())), zero)
        steps["loop[UPGrad]"] = _Step(make_loop(fit(UPGradWeighting())), zero)
    steps["fused[Mean]"] = _Step(make_fused(fit(MeanWeighting())), zero)
    steps["loop[Mean]"] = _Step(make_loop(fit(MeanWeighting())), zero)
    n_params = sum(p.numel() for p in model.parameters())
    n_rows = x.shape[0] * (1 if vector else y.shape[1])
    if with_upgrad and n_rows * n_params * 4 <= _MAX_JACOBIAN_BYTES:
        steps["autojac[UPGrad]"] = _Step(autojac, zero)
    return steps


def _median_times(steps: dict[str, _Step]) -> dict[str, float]:
    """Median seconds of each step, over interleaved rounds."""
    device = bench_device()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(_WARMUP_ROUNDS + _ROUNDS):
        for name, step in steps.items():
            if name.startswith("autojac") and round_index >= _WARMUP_ROUNDS + 3:
                continue  # slow, and only for reference
            step.reset()
            synchronize(device)
            start = time.perf_counter()
            step.run()
            synchronize(device)
            if round_index >= _WARMUP_ROUNDS:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run() -> list[dict[str, Any]]:
    set_threads(int(os.environ.get("TORCHJD_BENCH_THREADS", "2")))
    with_upgrad = _upgrad_is_implemented()
    if not with_upgrad:
        print("  UPGradWeighting is not implemented yet: [UPGrad] columns left out")
    rows = []
    for setting in _settings():
        steps = _steps(setting, with_upgrad)
        row: dict[str, Any] = {"model": setting.name, "B": setting.batch_size}
        for name, seconds in _median_times(steps).items():
            row[f"{name}_ms"] = 1e3 * seconds
        for name, step in steps.items():
            step.run()  # allocations made once (e.g. the optimizer's state) do not count
            step.reset()
            row[f"{name}_MB"] = peak_bytes(step.run, bench_device()) / 1e6
        for name in steps:
            if name != "sgd":
                row[f"{name}_x"] = row[f"{name}_ms"] / row["sgd_ms"]
                row[f"{name}_mem_x"] = row[f"{name}_MB"] / max(row["sgd_MB"], 1e-9)
        rows.append(row)
        print(f"  {setting.name} B={setting.batch_size} done", flush=True)
    columns = ["model", "B", "sgd_ms", "sgd_MB"]
    for name in ("fused[UPGrad]", "loop[UPGrad]", "fused[Mean]", "loop[Mean]", "autojac[UPGrad]"):
        if any(f"{name}_x" in row for row in rows):
            columns += [f"{name}_x", f"{name}_mem_x"]
    print(format_table(rows, columns))
    return rows


if __name__ == "__main__":
    run()
