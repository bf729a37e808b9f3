#!/usr/bin/env bash
# The one prepared run for a machine with a CUDA GPU (a session lent one runs it as
# `bash benchmarks/device_check.sh` in the repository root, with `timeout_s` around 540): the
# tests that exercise the GPU, then the benchmarks on it. Uses the machine's own python3 and torch
# (nothing is installed); the package is imported from `src/`. Logs and JSON results go to $OUT
# (the device tool's output folder) or to benchmarks/results/device.
set -uo pipefail
out="${OUT:-benchmarks/results/device}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1 TORCHJD_BENCH_DEVICE=cuda
python3 - <<'PY' 2>&1 | tee "$out/environment.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(0))
PY
# Tests: the device-parametrised ones, and those that put tensors on CUDA (a few minutes at most).
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/devices \
    tests/aggregation/test_registry.py tests/aggregation/test_cagrad.py \
    tests/aggregation/test_nash_mtl.py 2>&1 | tee "$out/tests.txt"
# Benchmarks on the GPU (the CPU figures are in docs/performance.md).
timeout 240 python3 -m benchmarks bench_dual_cone bench_autogram --output "$out" 2>&1 \
    | grep -v USDT | tee "$out/bench.txt"
