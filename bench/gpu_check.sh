#!/usr/bin/env bash
# GPU check, for a machine that already has a CUDA build of torch, nvcc, cmake,
# ninja, scikit-build-core and pybind11 (no network needed). Stages, each under
# its own time limit so that one slow stage cannot eat the others:
#   build     the prebuilt module from bench/prebuild_gpu.sh (.gpu-prebuilt/)
#             when it imports against this torch, else an in-place build for
#             this GPU's architecture only
#   test      the CUDA op tests, the large shapes included (top-k select at
#             F = 5000 and 50000, k up to F; every op in every dtype)
#   bench     dualenc bench at P and S, bfloat16 and float32, each with a
#             profiler breakdown of one fused step and the before/after of
#             each switchable design (--ab all: the fused step with the
#             design off against on, interleaved)
# The default (build,test,bench) fits 8 minutes of device time with the
# prebuilt module: about 0.5 min build, <= 2 min tests, <= 4 x 75 s benches.
# Opt-in stages (name them; they do not fit beside the default in 8 minutes):
#   sanitize  compute-sanitizer memcheck on the CUDA op tests, racecheck and
#             synccheck on the CUDA top-k tests
#   c1        dualenc bench at C1 on the GPU
#   ncu       Nsight Compute speed-of-light of the work-item scatter kernels
#             and the top-k select, on the large CUDA tests
#   sweep     sparse_decode gather vs dense at P's shape over k, and its
#             forward alone in the gather, dense and tiled forms (the "auto"
#             thresholds of ops.set_sparse_strategy, tiled_* included)
#   wgrad     sparse_weight_grads against the three weight-gradient ops it
#             replaces, gather form, at S and P (float32, bfloat16)
# Everything printed is also written under bench/results/gpu-<device>-<date>/,
# and, where $OUT is set (the device tool), copied to $OUT/<that name>/ and packed
# into $OUT/gpu-results.tgz.
#   PYTHON=python3 bash bench/gpu_check.sh [build,test,bench,sanitize,c1,ncu,sweep,wgrad]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
stages="${1:-build,test,bench}"
t0=$(date +%s)
want() { [[ ",$stages," == *",$1,"* ]]; }
export PYTHONUNBUFFERED=1
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo unknown)
out="bench/results/gpu-${device}-$(date -u +%Y%m%d)"
mkdir -p "$out"
log() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - t0 ))s $*" | tee -a "$out/summary.txt"; }
pack() {
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    log "total: $(( $(date +%s) - t0 ))s"
    tar czf "$OUT/gpu-results.tgz" -C bench/results "$(basename "$out")" && cp "$out/summary.txt" "$OUT/"
    cp -r "$out" "$OUT/" 2>/dev/null || true
  fi
}
trap pack EXIT
# run NAME SECONDS CMD...: a stage step with a time limit; its output goes to $out/NAME.txt
run() {
  local name=$1 limit=$2; shift 2
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  tail -12 "$out/$name.txt"
  [ $rc -eq 124 ] && log "$name: stopped at its ${limit}s limit"
  log "$name: exit $rc"
  return $rc
}

log "device: $device; stages: $stages"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1; head -12 "$out/nvidia-smi.txt"
cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 9.0)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}"

if want build; then
  prebuilt=$(ls .gpu-prebuilt/_C.*.so 2>/dev/null | head -1)
  src=$(find csrc cmake CMakeLists.txt -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
  ok=1
  if [ -n "$prebuilt" ] && [ "$(cat .gpu-prebuilt/source_hash 2>/dev/null)" != "$src" ]; then
    log "build: prebuilt module is from other sources (hash $(cat .gpu-prebuilt/source_hash 2>/dev/null), tree $src); building"
    prebuilt=""
  fi
  if [ -n "$prebuilt" ]; then
    cp "$prebuilt" dualenc_fast/
    if "$PY" -c "import torch, dualenc_fast._C" > "$out/build.txt" 2>&1; then
      ok=0
      log "build: using prebuilt $(basename "$prebuilt") ($(cat .gpu-prebuilt/commit 2>/dev/null), torch $(cat .gpu-prebuilt/torch_version 2>/dev/null))"
    else
      log "build: prebuilt module does not import here; building"; rm -f "dualenc_fast/$(basename "$prebuilt")"
    fi
  fi
  if [ $ok -ne 0 ]; then
    log "build: in place, DUALENC_CUDA=ON, archs $TORCH_CUDA_ARCH_LIST, no network"
    DUALENC_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      run build 480 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
      || { log "build failed, see $out/build.txt"; exit 1; }
  fi
  "$PY" -m dualenc_fast.cli info 2>&1 | tee "$out/info.txt"
fi

if want test; then
  log "test: CUDA op tests, large shapes included"
  run tests 120 "$PY" -m pytest tests/test_cuda_large.py tests/test_ops.py -m cuda -q -p no:cacheprovider \
    -k "not opcheck"
fi

if want sanitize; then
  san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ -x "$san" ]; then
    log "sanitize: memcheck on the CUDA op tests"
    run sanitizer-memcheck 240 "$san" --tool memcheck --error-exitcode 99 "$PY" -m pytest tests/test_ops.py \
      -q -p no:cacheprovider -m cuda -k "not compile and not opcheck"
    for tool in racecheck synccheck; do
      log "sanitize: $tool on the CUDA top-k tests"
      run "sanitizer-$tool" 120 "$san" --tool "$tool" --error-exitcode 99 "$PY" -m pytest tests/test_ops.py \
        -q -p no:cacheprovider -m cuda -k "topk and not opcheck"
    done
  else
    log "sanitize: compute-sanitizer not found"
  fi
fi

if want bench; then
  for cfg in P S; do
    for dt in bfloat16 float32; do
      log "bench: $cfg $dt (with a profile of the fused step)"
      run "bench-$cfg-$dt" 75 "$PY" -m dualenc_fast.cli bench --config "$cfg" --device cuda --dtype "$dt" \
        --repeats 3 --no-memory --profile --ab all --out "$out/bench-$cfg-$dt.json"
    done
  done
fi

if want c1; then
  log "bench: C1 float32"
  run bench-C1-float32 120 "$PY" -m dualenc_fast.cli bench --config C1 --device cuda --repeats 10 --no-memory \
    --out "$out/bench-C1-float32.json"
fi

if want ncu; then
  ncu_bin=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  if [ -x "$ncu_bin" ]; then
    log "ncu: SpeedOfLight of feature_rows (scatter_rows, dot_scatter_rows) / reduce_partials / topk_select"
    run ncu 150 "$ncu_bin" --section SpeedOfLight --launch-count 12 \
      --kernel-name "regex:feature_rows_kernel|reduce_partials_kernel|topk_select_kernel" \
      "$PY" -m pytest tests/test_cuda_large.py -q -p no:cacheprovider -k "heavy_feature or (large and f32 and 50000)"
  else
    log "ncu: not found"
  fi
fi

if want wgrad; then
  for cfg in S P; do
    for dt in float32 bfloat16; do
      log "wgrad: sparse_weight_grads vs the three ops, $cfg $dt"
      run "wgrad-$cfg-$dt" 90 "$PY" bench/weight_grads_timing.py --device cuda --config "$cfg" --dtype "$dt"
    done
  done
fi

if want sweep; then
  for dt in bfloat16 float32; do
    log "sweep: gather vs dense (forward + backward; forward alone with tiled) at P's shape, $dt"
    run "sweep-P-$dt" 150 "$PY" -m dualenc_fast.cli bench --config P --device cuda --dtype "$dt" --paths '' \
      --no-memory --repeats 5 --sweep-k 64,256,512,1024,2048,4096 --out "$out/sweep-P-$dt.json"
  done
fi
log "results in $out"
