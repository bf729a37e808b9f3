"""Where the time and the memory of one fused step go, phase by phase, for a model of the bench.

Usage: ``python -m benchmarks.fused_phases transformer 32`` (model names and batch sizes of
``bench_autogram``: ``mlp`` 32/128/512, ``cnn`` 32/128, ``transformer`` 32, ``embedding`` 128,
``"iwmtl[B,3]"`` 128). One thread. Prints the median times of ``sgd`` and ``fused[Mean]`` over
interleaved rounds, the time of each phase of the fused step (backward pass to the calls, each
module's Gramian block, each module's weighted gradients), and the memory held (above the level at
the step's start) when each phase starts and ends, and its peak, from the profiler's allocation
events. The phases are found by wrapping the engine's and the rules' methods: measure, do not
ship.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks._measure import set_threads
from benchmarks.bench_autogram import _settings, _steps
from torchjd.autogram import _engine
from torchjd.autogram._rules._base import GramianRule

_ROUNDS = 10
_PREFIX = "phase: "


def _label(module: nn.Module) -> str:
    weight = getattr(module, "weight", None)
    shape = f" {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
    return f"{type(module).__name__}{shape}"


class _Phases:
    """Times each phase (and marks it for the profiler) while installed."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        # A rule's method calling another wrapped one (the default `add_...` calls
        # `gramian_then_...`) is one phase.
        self.in_rule = False

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with record_function(_PREFIX + name):
            yield
        self.seconds[name].append(time.perf_counter() - start)

    def install(self) -> None:
        phases = self

        def timed(method: Callable[..., Any], name: str) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with phases.phase(name):
                    return method(*args, **kwargs)

            return wrapper

        engine = _engine.Engine
        engine._differentiate = timed(engine._differentiate, "backward to the calls")  # type: ignore[method-assign]
        engine._write_gradients = timed(engine._write_gradients, "weighted gradients")  # type: ignore[method-assign]
        for rule_type in _rule_types():
            for method_name in (
                "gramian_then_weighted_gradients",
                "add_gramian_then_weighted_gradients",
            ):
                if method_name in vars(rule_type) or rule_type is GramianRule:
                    setattr(
                        rule_type, method_name, _timed_rule(getattr(rule_type, method_name), phases)
                    )


def _rule_types() -> list[type]:
    found: list[type] = []
    stack: list[type] = [GramianRule]
    while stack:
        rule_type = stack.pop()
        found.append(rule_type)
        stack.extend(rule_type.__subclasses__())
    return found


def _timed_rule(method: Callable[..., Any], phases: _Phases) -> Callable[..., Any]:
    def wrapper(self: GramianRule, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if phases.in_rule:
            return method(self, module, *args, **kwargs)
        label = _label(module)
        phases.in_rule = True
        try:
            with phases.phase(f"  block {label}"):
                result = method(self, module, *args, **kwargs)
        finally:
            phases.in_rule = False
        weighted = result[1] if isinstance(result, tuple) else result

        def timed_weighted(weights: torch.Tensor) -> dict[str, torch.Tensor]:
            if phases.in_rule:
                return weighted(weights)
            phases.in_rule = True
            try:
                with phases.phase(f"  weighted {label}"):
                    return weighted(weights)
            finally:
                phases.in_rule = False

        return (result[0], timed_weighted) if isinstance(result, tuple) else timed_weighted

    return wrapper


def main() -> None:
    name, batch_size = sys.argv[1], int(sys.argv[2])
    set_threads(1)
    setting = next(s for s in _settings() if s.name == name and s.batch_size == batch_size)
    steps = _steps(setting, with_upgrad=False)
    phases = _Phases()
    phases.install()
    times: dict[str, list[float]] = {"sgd": [], "fused[Mean]": []}
    for round_index in range(_ROUNDS + 2):
        if round_index == 2:
            phases.seconds.clear()
        for step_name, values in times.items():
            step = steps[step_name]
            step.reset()
            start = time.perf_counter()
            step.run()
            if round_index >= 2:
                values.append(time.perf_counter() - start)
    sgd, fused = (statistics.median(values) for values in times.values())
    print(f"{name} B={batch_size}: sgd {1e3 * sgd:.2f} ms, fused[Mean] {1e3 * fused:.2f} ms "
          f"({fused / sgd:.2f}x)")  # fmt: skip
    for phase, values in phases.seconds.items():
        print(f"  {phase:45s} {1e3 * sum(values) / _ROUNDS:7.2f} ms")
    for step_name in times:
        step = steps[step_name]
        step.reset()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step.run()
        _print_memory(step_name, prof)


def _print_memory(step_name: str, prof: profile) -> None:
    assert prof.profiler is not None and prof.profiler.kineto_results is not None
    events = list(prof.profiler.kineto_results.events())
    timeline = []
    current = 0
    memory = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]  # type: ignore[attr-defined]
    for start, size in sorted(memory):
        current += size
        timeline.append((start, current))
    peak = max((held for _, held in timeline), default=0)
    print(f"{step_name}: peak {peak / 1e6:.1f} MB above the start")

    def held_at(moment: int) -> int:
        held = 0
        for start, value in timeline:
            if start > moment:
                break
            held = value
        return held

    spans = sorted(
        (e.start_ns(), e.end_ns(), e.name()[len(_PREFIX) :])
        for e in events
        if e.name().startswith(_PREFIX)
    )
    for start, end, name in spans:
        inside = [held for moment, held in timeline if start <= moment <= end]
        print(f"  {name:45s} start {held_at(start) / 1e6:6.1f}  end {held_at(end) / 1e6:6.1f}  "
              f"max {max(inside, default=0) / 1e6:6.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
