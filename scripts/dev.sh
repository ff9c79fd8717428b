#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3 and a C++ compiler; nvcc optional):
#   bash scripts/dev.sh bench [args]   set up, build, run `python -m fusedtrain.bench`
#   bash scripts/dev.sh test  [args]   set up, build, run the test suite
#   bash scripts/dev.sh setup          set up and build only
# It creates a virtual environment (.venv, or $FUSEDTRAIN_VENV), installs torch, torchvision and timm
# (models for the transfer-learning tests), scikit-learn and matplotlib (the examples' data and plots,
# run by tests/test_examples.py) and the build and test tools into it, and builds fusedtrain in place
# (CUDA kernels when torch is a CUDA build and nvcc is found; FUSEDTRAIN_CPU_ONLY=1 to skip them).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
shift || true

venv="${FUSEDTRAIN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q "torch>=2.6" torchvision timm numpy scikit-learn matplotlib ninja pytest hypothesis expecttest \
  "setuptools>=64" wheel
python -m pip install -q --no-build-isolation -e .
python -c "import fusedtrain, json; print('fusedtrain build:', json.dumps(fusedtrain.build_info()))"

case "$what" in
  bench) exec python -m fusedtrain.bench "$@" ;;
  test) exec python -m pytest -q "$@" ;;
  setup) ;;
  *) echo "usage: bash scripts/dev.sh bench|test|setup [args]" >&2; exit 2 ;;
esac
