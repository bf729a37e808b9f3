"""Time and accuracy of the dual-cone projections of ``UPGradWeighting``.

For ``m`` in 2, 8, 32, 128, 512, with 1 and with 2 threads, on three float64 Gramians (``kind``):
``full`` and ``rank m/4``, of a random ``m x 2m`` Jacobian of full rank and of rank
``max(1, m // 4)`` (about half of the constraints are active at the solutions); ``iwrm``, of the
per-sample gradients of the cross-entropy losses of an MLP 784-512-512-10 at initialisation on
``m`` random samples (computed by the autogram engine), the problems of a real IWRM step: nearly
orthogonal, slightly conflicting rows, where about 90% of the constraints are inactive.

- ``ours_ms``: median time of ``UPGradWeighting()(G)`` (the default solver, ``"active_set"``);
- ``quadprog_ms``: median time of ``UPGradWeighting(solver="quadprog")(G)``, the method of
  torchjd 0.8.0 (one QP per row), when quadprog is installed; at ``m = 512`` it would take minutes,
  so it is estimated from ``_QUADPROG_SAMPLE`` rows (``quadprog_estimated``);
- ``speedup``: ``quadprog_ms / ours_ms``;
- ``max_rel_error``: largest difference between the projections of the two solvers (all rows, or
  the sampled ones), relative to the largest entry;
- ``masked_cpu_ms``: for ``m ≥ 32``, median time of the solver's accelerator path (fixed-shape
  systems, one host read per round) run on the CPU, on the same problems (without the
  normalisation): what that path's algorithm costs, not a GPU time;
- ``max_kkt``: largest violation of the optimality conditions by our projections, relative to the
  natural scale of each condition (see :func:`_kkt_violation`).

Run alone with ``python -m benchmarks.bench_dual_cone``; ``TORCHJD_BENCH_DEVICE=cuda`` runs ours on
a GPU (quadprog, like torchjd 0.8.0, runs on the CPU: the Gramian is copied there).
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch
from torch import Tensor

from benchmarks._measure import bench_device, format_table, median_seconds, set_threads
from torchjd.aggregation import UPGradWeighting
from torchjd.aggregation._dual_cone import _Problem, _solve_masked, solve_dual_cone_qp
from torchjd.aggregation._utils import normalize, regularize

_SIZES = (2, 8, 32, 128, 512)
_QUADPROG_SAMPLE = 16
_MASKED_MIN_SIZE = 32
_FULL_QUADPROG_LIMIT = 128
_THREADS = (1, 2)
_COLUMNS = (
    "device",
    "threads",
    "m",
    "kind",
    "ours_ms",
    "quadprog_ms",
    "quadprog_estimated",
    "speedup",
    "max_rel_error",
    "masked_cpu_ms",
    "max_kkt",
)


def _gramian(m: int, kind: str, seed: int) -> Tensor:
    if kind == "iwrm":
        return _iwrm_gramian(m, seed)
    rank = m if kind == "full" else max(1, m // 4)
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, 2 * m, generator=generator, dtype=torch.float64)
    jacobian = left @ right
    return jacobian @ jacobian.T


def _iwrm_gramian(m: int, seed: int) -> Tensor:
    from benchmarks.bench_autogram import _mlp
    from torchjd.autogram import Engine

    torch.manual_seed(seed)
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    inputs, targets = torch.randn(m, 784), torch.randint(0, 10, (m,))
    losses = torch.nn.functional.cross_entropy(model(inputs), targets, reduction="none")
    gramian = engine.compute_gramian(losses).to(torch.float64)
    # Computed in float32, it is symmetric up to float32 rounding only: the solvers read the
    # symmetric part, so the KKT check must too.
    return (gramian + gramian.T) / 2


def _kkt_violation(gramian: Tensor, lower: Tensor, solution: Tensor) -> float:
    """Largest relative violation of: ``v ≥ u``; ``G v ≥ 0``; ``G v = 0`` where ``v > u``."""
    products = solution @ gramian
    magnitudes = solution.abs() + lower.abs()
    product_scale = (magnitudes @ gramian.abs()).amax(dim=1, keepdim=True).clamp_min(1e-300)
    gap_scale = magnitudes.amax(dim=1, keepdim=True).clamp_min(1e-300)
    gap = solution - lower
    violations = [
        (-gap / gap_scale).clamp_min(0.0).max(),
        (-products / product_scale).clamp_min(0.0).max(),
        torch.minimum(gap / gap_scale, products.abs() / product_scale).max(),
    ]
    return max(violation.item() for violation in violations)


def _quadprog_rows(gramian: Tensor, lower: Tensor) -> Tensor:
    from torchjd.aggregation._dual_cone_quadprog import project_weights_quadprog

    return project_weights_quadprog(lower, gramian)


def _repeats(m: int) -> int:
    # Small problems take tens of microseconds: many repeats make the median stable.
    return 3 if m >= 512 else 10 if m >= 128 else 200


def _row(m: int, kind: str, has_quadprog: bool) -> dict[str, Any]:
    gramian = _gramian(m, kind, seed=m)
    device = bench_device()
    on_device = gramian.to(device)
    ours = median_seconds(
        lambda: UPGradWeighting()(on_device), repeats=_repeats(m), warmup=2, device=device
    )
    # The problems UPGradWeighting solves: u_i e_i against the normalised, regularised Gramian.
    weights = torch.full((m,), 1 / m, dtype=torch.float64)
    lower = torch.diag(weights)
    regularized = regularize(normalize(gramian, 0.0001), 0.0001)
    solution = solve_dual_cone_qp(lower.to(device), regularized.to(device)).cpu()
    row: dict[str, Any] = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "m": m,
        "kind": kind,
        "ours_ms": ours * 1e3,
        "max_kkt": _kkt_violation(regularized, lower, solution),
    }
    if m >= _MASKED_MIN_SIZE and device.type == "cpu":
        symmetric = (regularized + regularized.T) / 2
        problem = _Problem(symmetric / symmetric.trace(), lower)
        row["masked_cpu_ms"] = 1e3 * median_seconds(
            lambda: _solve_masked(problem), repeats=max(3, _repeats(m) // 4), warmup=1
        )
    if not has_quadprog:
        return row
    if m <= _FULL_QUADPROG_LIMIT:
        quadprog = median_seconds(
            lambda: UPGradWeighting(solver="quadprog")(gramian),
            repeats=max(3, _repeats(m) // 4),
            warmup=1,
        )
        reference, sampled = _quadprog_rows(regularized, lower), slice(None)
        row["quadprog_estimated"] = False
    else:
        sampled = slice(0, m, m // _QUADPROG_SAMPLE)
        start = time.perf_counter()
        reference = _quadprog_rows(regularized, lower[sampled])
        quadprog = (time.perf_counter() - start) * m / reference.shape[0]
        row["quadprog_estimated"] = True
    error = (solution[sampled] - reference).abs().max() / reference.abs().max()
    row.update(quadprog_ms=quadprog * 1e3, speedup=quadprog / ours, max_rel_error=error.item())
    return row


def run() -> list[dict[str, Any]]:
    has_quadprog = importlib.util.find_spec("quadprog") is not None
    rows = []
    for threads in _THREADS:
        set_threads(threads)
        rows += [
            _row(m, kind, has_quadprog) for m in _SIZES for kind in ("full", "rank m/4", "iwrm")
        ]
    print(format_table(rows, _COLUMNS))
    if not has_quadprog:
        print('quadprog is not installed (pip install "torchjd[quadprog]"): no comparison.')
    return rows


if __name__ == "__main__":
    run()
