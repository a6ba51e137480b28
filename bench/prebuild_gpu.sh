#!/usr/bin/env bash
# Builds the CUDA extension here, where compile time costs nothing, for the lent
# GPU machine (Python 3.12, torch 2.11.0+cu130, no network), so that its
# device time goes to tests and benchmarks instead of nvcc:
#   bash bench/prebuild_gpu.sh            # -> .gpu-prebuilt/_C.cpython-312-*.so
# then carry `.gpu-prebuilt` to the GPU machine; bench/gpu_check.sh uses the
# prebuilt module when it imports against that machine's torch, else it builds.
# Environment: PY312 (default python3.12), TORCH_SPEC (default torch==2.11.0),
# TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200), DUALENC_GPU_VENV (default .venv-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
find_py312() {
  if python3.12 -c "" >/dev/null 2>&1; then echo python3.12; return; fi
  if command -v pyenv >/dev/null 2>&1; then  # a pyenv install not on the PATH
    local p
    p=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
    [ -n "$p" ] && { echo "$p"; return; }
  fi
  echo "prebuild_gpu: no Python 3.12 found; set PY312" >&2; exit 1
}
PY312="${PY312:-$(find_py312)}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.11.0}"
VENV="${DUALENC_GPU_VENV:-.venv-gpu}"
PIP() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/python" -c "import torch" >/dev/null 2>&1 || PIP install -q "$TORCH_SPEC"
PIP install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja numpy
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
echo "== building for Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), torch $torch_version, archs ${TORCH_CUDA_ARCH_LIST:-9.0}"

rm -rf .gpu-prebuilt && mkdir -p .gpu-prebuilt/wheel
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" DUALENC_CUDA=ON \
  PIP wheel --no-build-isolation --no-deps -v -w .gpu-prebuilt/wheel . \
  | grep -E "dualenc_fast:|Building (CXX|CUDA)|Linking|FAILED|error|Error|Successfully" || true
whl=$(ls .gpu-prebuilt/wheel/dualenc_fast-*.whl)
"$VENV/bin/python" - "$whl" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith("dualenc_fast/_C") and name.endswith(".so"):
            with open(".gpu-prebuilt/" + name.split("/")[-1], "wb") as fh:
                fh.write(z.read(name))
            print("==", ".gpu-prebuilt/" + name.split("/")[-1])
PY
rm -rf .gpu-prebuilt/wheel
echo "$torch_version" > .gpu-prebuilt/torch_version
git describe --always --dirty > .gpu-prebuilt/commit 2>/dev/null || true
# what gpu_check.sh compares before it trusts the module: the compiled sources
find csrc cmake CMakeLists.txt -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16 \
  > .gpu-prebuilt/source_hash
ls -la .gpu-prebuilt
