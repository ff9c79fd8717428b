#!/usr/bin/env bash
# The one GPU check (H100/H200 lent machine: torch 2.11 + CUDA 13.0, Python 3.12, 16 cores, no internet).
# Builds for sm_90 with all cores, runs the whole test suite (CUDA cases included) and the CUDA
# benchmark, and writes every log under $OUT. Budget: well under 8 minutes.
#   usage: bash benchmarks/gpu_check.sh [extra args for python -m fusedtrain.bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fusedtrain-gpu}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import fusedtrain; print(fusedtrain.build_info())"

start=$(date +%s)
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/ > "$OUT/tests.log" 2>&1
echo "tests: exit $? in $(( $(date +%s) - start )) s"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20

start=$(date +%s)
timeout 300 "$PY" -m fusedtrain.bench --device cuda --no-progress --json "$OUT/bench_cuda.json" "$@" \
  > "$OUT/bench_cuda.txt" 2>&1
echo "bench: exit $? in $(( $(date +%s) - start )) s"
cat "$OUT/bench_cuda.txt"
