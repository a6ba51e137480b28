#!/usr/bin/env bash
# GPU check, for a machine that already has a CUDA build of torch, nvcc, cmake,
# ninja, scikit-build-core and pybind11 (no network needed): builds in place,
# runs the op tests (CUDA variants included), compute-sanitizer on the CUDA
# op tests, and the GPU benchmarks. Everything printed is also written under
# bench/results/gpu-<device>-<date>/ to be committed.
#   PYTHON=python3 bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
quick="${1:-}"
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo unknown)
out="bench/results/gpu-${device}-$(date -u +%Y%m%d)"
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/summary.txt"; }

log "device: $device"
nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt" | head -15

log "build (DUALENC_CUDA=ON, in place, no network)"
DUALENC_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . > "$out/build.txt" 2>&1
rc=$?; tail -3 "$out/build.txt"; [ $rc -eq 0 ] || { log "build failed (rc=$rc), see $out/build.txt"; exit $rc; }
"$PY" -m dualenc_fast.cli info | tee "$out/info.txt"

log "op tests (CPU and CUDA)"
"$PY" -m pytest tests/test_ops.py tests/test_reference.py -q -p no:cacheprovider 2>&1 | tee "$out/tests.txt" | tail -15

log "compute-sanitizer memcheck on the CUDA op tests"
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$san" ]; then
  "$san" --tool memcheck --error-exitcode 99 "$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider \
    -m cuda -k "not compile and not opcheck" 2>&1 | tee "$out/sanitizer.txt" | tail -8
else
  log "compute-sanitizer not found"
fi

if [ "$quick" != "--quick" ]; then
  for dt in bfloat16 float32; do
    log "bench P $dt"
    "$PY" -m dualenc_fast.cli bench --config P --device cuda --dtype "$dt" --repeats 5 --no-memory \
      --out "$out/bench-P-$dt.json" 2>&1 | tee "$out/bench-P-$dt.txt"
  done
  log "bench C1 float32 on the GPU"
  "$PY" -m dualenc_fast.cli bench --config C1 --device cuda --repeats 10 --no-memory \
    --out "$out/bench-C1-float32.json" 2>&1 | tee "$out/bench-C1-float32.txt"
fi
log "results in $out"
