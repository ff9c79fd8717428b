#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3 and a C++ compiler; nvcc optional):
#   bash scripts/dev.sh bench [args]     set up, build, run `python -m fusedtrain.bench`
#   bash scripts/dev.sh test  [args]     set up, build, run the test suite
#   bash scripts/dev.sh setup            set up and build only
#   bash scripts/dev.sh wheel            build an sdist and a wheel into dist/, then test the wheel in a fresh
#                                        virtual environment that has torch but no compiler
#   bash scripts/dev.sh sanitize [args]  build the CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer
#                                        into .venv-sanitize and run pytest there (default: tests/, not cuda)
# It creates a virtual environment (.venv, or $FUSEDTRAIN_VENV), installs torch, torchvision and timm
# (models for the transfer-learning tests, the reference Lion), schedulefree (the reference schedule-free
# optimizers of tests/test_optim_beyond_torch.py), scikit-learn and matplotlib (the examples' data and plots,
# run by tests/test_examples.py), transformers, accelerate and pytorch-lightning (tests/test_integrations.py)
# and the build and test tools into it, and builds fusedtrain in place
# (CUDA kernels when torch is a CUDA build and nvcc is found; FUSEDTRAIN_CPU_ONLY=1 to skip them).
# Run again, it reinstalls nothing whose inputs are unchanged: the packages when the list below is the same,
# the build when the sources, torch and the build settings are (scripts/build_stamp.py); a changed source
# recompiles only what depends on it (setup.py keeps the objects in build/).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
shift || true

# The packages of every environment this script makes: add new test or benchmark dependencies to this line.
install_deps() {
  python -m pip install -q "torch>=2.6" torchvision timm schedulefree numpy scikit-learn matplotlib ninja pytest \
    hypothesis expecttest "setuptools>=64" wheel transformers accelerate pytorch-lightning
}

# make_venv DIR: create DIR if needed, activate it, and install the packages unless this list is already in.
make_venv() {
  [ -x "$1/bin/python" ] || python3 -m venv "$1"
  # shellcheck disable=SC1091
  . "$1/bin/activate"
  local want
  want="$(declare -f install_deps | sha256sum)"
  if [ "$(cat "$1/.fusedtrain-deps" 2>/dev/null)" != "$want" ]; then
    install_deps
    echo "$want" > "$1/.fusedtrain-deps"
  fi
}

# install_fusedtrain STAMP_ARGS... -- PIP_ARGS...: pip install fusedtrain unless the fingerprint of its inputs
# (scripts/build_stamp.py STAMP_ARGS) is the one recorded after the last install into this environment.
install_fusedtrain() {
  local stamp_args=() pip_args=()
  while [ "$1" != "--" ]; do stamp_args+=("$1"); shift; done
  shift
  pip_args=("$@")
  local file="$VIRTUAL_ENV/.fusedtrain-build" before after
  before="$(python scripts/build_stamp.py "${stamp_args[@]}")"  # "INPUTS LIBRARY"
  if [ "$before" = "$(cat "$file" 2>/dev/null)" ]; then
    echo "fusedtrain: build up to date (sources, torch and build settings unchanged since the last install)"
    return
  fi
  rm -f "$file"
  echo "fusedtrain: building and installing (a first build compiles everything, the CUDA kernels for every default"
  echo "architecture included: tens of minutes on 2 cores; later builds recompile only what changed)"
  python -m pip install -q --no-build-isolation "${pip_args[@]}"
  after="$(python scripts/build_stamp.py "${stamp_args[@]}")"
  # The inputs as the build read them (an edit during the build must trigger the next one), the library it made.
  echo "${before% *} ${after#* }" > "$file"
}

print_build_info() {
  python -c "import fusedtrain, json; print('fusedtrain build:', json.dumps(fusedtrain.build_info()))"
}

case "$what" in
  bench|test|setup)
    make_venv "${FUSEDTRAIN_VENV:-.venv}"
    install_fusedtrain -- -e .
    print_build_info
    case "$what" in
      bench) exec python -m fusedtrain.bench "$@" ;;
      test) exec python -m pytest -q "$@" ;;
    esac
    ;;
  wheel)
    make_venv "${FUSEDTRAIN_VENV:-.venv}"
    python -m pip install -q build
    rm -rf dist
    # The sdist, then the wheel from this tree (it reuses the objects in build/, so an unchanged tree only links).
    python -m build --no-isolation --sdist --outdir dist .
    python -m build --no-isolation --wheel --outdir dist .
    python scripts/wheel_check.py sdist dist/*.tar.gz
    facts="$(python scripts/wheel_check.py describe dist/*.whl)"  # read from the wheel with the toolkit's tools
    # A fresh environment with the same torch and nothing else: no compiler on PATH, no CUDA toolkit, no source tree.
    test_venv=build/venv-wheel-test
    rm -rf "$test_venv"
    python3 -m venv "$test_venv"
    torch_version="$(python -c 'import importlib.metadata as m; print(m.version("torch"))')"
    "$test_venv/bin/python" -m pip install -q "torch==$torch_version"
    "$test_venv/bin/python" -m pip install -q dist/*.whl
    cd /
    env -i HOME="$HOME" PATH="$OLDPWD/$test_venv/bin" "$OLDPWD/$test_venv/bin/python" \
      "$OLDPWD/scripts/wheel_check.py" install "$facts"
    ;;
  sanitize)
    # Its own environment and object directory, so the sanitized build never replaces the normal one.
    make_venv .venv-sanitize
    export FUSEDTRAIN_CPU_ONLY=1 FUSEDTRAIN_BUILD_DIR="$PWD/build/sanitize"
    sanitizers="-fsanitize=address,undefined"
    export FUSEDTRAIN_EXTRA_CXXFLAGS="$sanitizers -fsanitize-recover=address -fno-omit-frame-pointer -g -O1"
    export FUSEDTRAIN_EXTRA_LDFLAGS="$sanitizers"
    site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
    install_fusedtrain --python --library "$site/fusedtrain/_C*.so" -- --no-deps .
    logs="$PWD/build/sanitize/logs"
    rm -rf "$logs" && mkdir -p "$logs"
    cxx="${CXX:-g++}"
    # ASan's runtime must come first in the process; libstdc++ too, or importing triton aborts in __cxa_throw.
    preload="$(realpath "$("$cxx" -print-file-name=libasan.so)")"
    preload="$preload:$(realpath "$("$cxx" -print-file-name=libstdc++.so.6)")"
    # Python's allocator keeps memory for good (no leak checking); torch's CUDA libraries map memory where ASan
    # protects its shadow gap, and define some symbols twice (ODR); keep going after a report and log it.
    sanitized=(env LD_PRELOAD="$preload"
      ASAN_OPTIONS="detect_leaks=0:halt_on_error=0:protect_shadow_gap=0:detect_odr_violation=0:log_path=$logs/report"
      UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0:log_path=$logs/report")
    "${sanitized[@]}" python -c "import fusedtrain as f; print('fusedtrain:', f.__file__, f.build_info())"
    set +e
    "${sanitized[@]}" python -m pytest -q -p no:cacheprovider -m "not cuda" "$@"
    rc=$?
    set -e
    reports="$(cat "$logs"/report.* 2>/dev/null | grep -cE "ERROR: AddressSanitizer|runtime error:" || true)"
    for f in "$logs"/report.*; do
      [ -e "$f" ] && { echo "== $f"; head -n 60 "$f"; }
    done
    echo "sanitize: pytest exit code $rc; $reports AddressSanitizer/UndefinedBehaviorSanitizer report(s) (logs: $logs)"
    [ "$rc" -eq 0 ] && [ "$reports" -eq 0 ]
    ;;
  *) echo "usage: bash scripts/dev.sh bench|test|setup|wheel|sanitize [args]" >&2; exit 2 ;;
esac
