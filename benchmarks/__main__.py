"""Run every benchmark, print the tables and save them as JSON in benchmarks/results/."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
from pathlib import Path

import torch

SUITES = ("bench_autogram", "bench_dual_cone", "bench_autojac")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", default=SUITES, help=f"any of {SUITES}")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    arguments = parser.parse_args()
    arguments.output.mkdir(parents=True, exist_ok=True)
    for suite in arguments.suites:
        module = importlib.import_module(f"benchmarks.{suite}")
        print(f"\n=== {suite} ===")
        rows = module.run()
        record = {
            "suite": suite,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        path = arguments.output / f"{suite}.json"
        path.write_text(json.dumps(record, indent=2))
        print(f"saved {path}")


if __name__ == "__main__":
    main()
