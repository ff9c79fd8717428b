#!/usr/bin/env bash
# The one GPU check (H100/H200 lent machine: torch 2.11 + CUDA 13.0, Python 3.12, 16 cores, no internet).
# Builds for sm_90 with all cores, runs the CUDA tests (CI runs the rest), splits the step
# into kernel and host time (benchmarks/kernel_profile.py), and runs the CUDA benchmark (every family:
# optimizers, EMA, clipping, mixed precision, ...). Every log goes under $OUT. Budget: under 10 minutes.
#   usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fusedtrain-gpu}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${FT_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
TORCHLIB=$("$PY" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
  "${CXX:-g++}" --version | head -1; command -v g++ gcc; ls /opt/gcc/bin 2>/dev/null | head -3
  ls "$TORCHLIB" | grep -i omp
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The image's default toolchain (/opt/gcc, via CC/CXX) carries its own copy of libstdc++'s stream
# code into the extension, which then crashes formatting an error message on a stream made by the
# system libstdc++ (seen 2026-11-26: a segfault in ostream::_M_insert<unsigned long> inside _C.so).
# Build with the system compilers, which link the one libstdc++ torch uses.
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; fi
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH="$PWD/python"
"$PY" -c "import fusedtrain; print(fusedtrain.build_info())"
ldd python/fusedtrain/_C*.so | grep -iE "omp|stdc" | tee -a "$OUT/env.txt"

# a C++ error raised inside an op must surface as a Python RuntimeError
cat > /tmp/ft_repro.py <<'PYEOF'
import torch, fusedtrain
try:
    torch.ops.fusedtrain.step_("sgd", [0.0] * 6, [torch.randn(4)], [torch.randn(5)], [], [], [], [], [], 0.1)
except RuntimeError as e:
    print("raised as expected:", str(e).splitlines()[0][:120])
PYEOF
if ! "$PY" /tmp/ft_repro.py > "$OUT/diag.txt" 2>&1; then
  echo "repro crashed; backtrace:" | tee -a "$OUT/diag.txt"
  timeout 90 cuda-gdb -batch -ex run -ex bt --args "$PY" /tmp/ft_repro.py >> "$OUT/diag.txt" 2>&1
  grep -E "^#[0-9]" "$OUT/diag.txt" | head -25
fi
cat "$OUT/diag.txt" | head -3

start=$(date +%s)
# CUDA-marked tests only: CI runs everything else on every push.
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ > "$OUT/tests.log" 2>&1
echo "tests: exit $? in $(( $(date +%s) - start )) s"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)|Fatal|Segmentation" "$OUT/tests.log" | head -20

timeout 150 "$PY" benchmarks/kernel_profile.py --json "$OUT/kernel_profile.json" > "$OUT/kernel_profile.txt" 2>&1
cat "$OUT/kernel_profile.txt"
start=$(date +%s)
# every family but lowbit (timed on its own below, so that a slow low-bit row cannot cost the others' table)
families=$("$PY" -c "from fusedtrain.bench.cli import FAMILIES; print(' '.join(f'--family {f}' for f in FAMILIES if f != 'lowbit'))")
timeout 200 "$PY" -m fusedtrain.bench --device cuda --no-progress $families --json "$OUT/bench_cuda.json" \
  > "$OUT/bench_cuda.txt" 2>&1
echo "bench: exit $? in $(( $(date +%s) - start )) s"
cat "$OUT/bench_cuda.txt"
start=$(date +%s)
timeout 60 "$PY" -m fusedtrain.bench --device cuda --no-progress --family lowbit --json "$OUT/bench_lowbit.json" \
  > "$OUT/bench_lowbit.txt" 2>&1
echo "bench lowbit: exit $? in $(( $(date +%s) - start )) s"
cat "$OUT/bench_lowbit.txt"
