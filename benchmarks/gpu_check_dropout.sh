#!/usr/bin/env bash
# GPU check of the dropout family and the penalty (issue 4) on a lent H100/H200: build for sm_90, run their
# tests (CUDA cases included: CPU mask == CUDA mask for the same seed), then the CUDA benchmark (2^27 elements,
# float32 and bfloat16, CUDA events). Logs under $OUT. Budget: about 4 minutes with 16 cores.
#   usage: bash benchmarks/gpu_check_dropout.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fusedtrain-gpu}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${FT_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++  # see gpu_check.sh: the system libstdc++
start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; fi
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH="$PWD/python"
"$PY" -c "import fusedtrain, torch; print(fusedtrain.build_info(), torch.cuda.get_device_name())"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_dropout.py tests/test_regularization.py \
  > "$OUT/tests.log" 2>&1
echo "tests: exit $?"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
timeout 200 "$PY" benchmarks/bench_dropout.py --device cuda --no-progress --json "$OUT/bench_dropout_cuda.json" \
  > "$OUT/bench_dropout_cuda.txt" 2>&1
echo "bench: exit $?"
cat "$OUT/bench_dropout_cuda.txt"
