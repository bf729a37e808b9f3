"""Cost of a Jacobian-descent step relative to a plain SGD step, on the issue's model zoo.

For each model and batch size, in one process: median time and peak memory of
- ``sgd``: ``losses.mean().backward()`` then ``optimizer.step()``,
- ``autojac``: ``torchjd.autojac.backward(losses, UPGrad())``,
- ``loop``: the 0.8.0 loop ``engine.compute_gramian`` + ``weighting`` + ``losses.backward(w)``,
- ``fused``: ``engine.backward(losses, weighting)`` (Gramian, weights and ``.grad`` in one pass),
each including the forward pass, and their ratios to ``sgd``. The weighting is UPGradWeighting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._measure import format_table, median_seconds, peak_bytes, set_threads
from torchjd.aggregation import Flattening, UPGrad, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autojac import backward

_MAX_JACOBIAN_BYTES = 1.5e9


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


def _steps(setting: Setting) -> dict[str, Callable[[], Any]]:
    torch.manual_seed(0)
    model = setting.make_model()
    x, y = setting.make_batch(setting.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine = Engine(model, batch_dim=0)
    gramian_weighting = UPGradWeighting()
    weighting: Any = gramian_weighting if setting.name[:5] != "iwmtl" else Flattening(gramian_weighting)
    aggregator = UPGrad()

    def sgd() -> None:
        optimizer.zero_grad()
        setting.losses_of(model, x, y).mean().backward()
        optimizer.step()

    def autojac() -> None:
        optimizer.zero_grad()
        backward(setting.losses_of(model, x, y).reshape(-1), aggregator)
        optimizer.step()

    def loop() -> None:
        optimizer.zero_grad()
        losses = setting.losses_of(model, x, y)
        losses.backward(weighting(engine.compute_gramian(losses)))
        optimizer.step()

    def fused() -> None:
        optimizer.zero_grad()
        engine.backward(setting.losses_of(model, x, y), weighting)  # type: ignore[attr-defined]
        optimizer.step()

    steps: dict[str, Callable[[], Any]] = {"sgd": sgd, "loop": loop}
    n_params = sum(p.numel() for p in model.parameters())
    n_rows = setting.losses_of(model, x, y).numel()
    if n_rows * n_params * 4 <= _MAX_JACOBIAN_BYTES:
        steps["autojac"] = autojac
    if hasattr(engine, "backward"):
        steps["fused"] = fused
    return steps


def run() -> list[dict[str, Any]]:
    set_threads(2)
    rows = []
    for setting in _settings():
        steps = _steps(setting)
        row: dict[str, Any] = {"model": setting.name, "B": setting.batch_size}
        for name, step in steps.items():
            repeats = 3 if name == "autojac" else 10
            row[f"{name}_ms"] = 1e3 * median_seconds(step, repeats=repeats)
            row[f"{name}_peak_MB"] = peak_bytes(step) / 1e6
        for name in steps:
            if name != "sgd":
                row[f"{name}_x"] = row[f"{name}_ms"] / row["sgd_ms"]
                row[f"{name}_mem_x"] = row[f"{name}_peak_MB"] / max(row["sgd_peak_MB"], 1e-9)
        rows.append(row)
        print(f"  {setting.name} B={setting.batch_size} done", flush=True)
    columns = ["model", "B", "sgd_ms", "sgd_peak_MB"]
    for name in ("fused", "loop", "autojac"):
        columns += [f"{name}_x", f"{name}_mem_x"]
    print(format_table(rows, columns))
    return rows


if __name__ == "__main__":
    run()
