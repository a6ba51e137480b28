// Self-test kernels of the CUDA emulator (csrc/emu/emu.h), compiled only into
// the emulated module: one kernel using every emulated primitive, one with a
// missing __syncthreads that only a seeded schedule exposes, 16-byte loads, and
// kernels that misuse barriers, warp intrinsics and loads, each of which must
// raise (never hang).
// Driven from tests/test_emu.py through dualenc_fast._C_emu.selftest(name).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops/cuda/launch.cuh"

namespace dualenc_fast::emu_selftest {

constexpr int kFields = 16;

// Block (48, 2) = 3 warps, grid (2, 3); `out` gets kFields values per thread.
__global__ void primitives_kernel(long long* out, long long* counter) {
  __shared__ int s_tile[96];
  __shared__ unsigned int s_count;
  __shared__ int s_max;
  extern __shared__ float dyn[];
  const int t = threadIdx.x + threadIdx.y * blockDim.x;
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  const int blk = blockIdx.x + blockIdx.y * gridDim.x;
  const int lane = t % warpSize;
  long long* o = out + static_cast<long long>(blk * nthreads + t) * kFields;
  const unsigned active = __activemask();  // every lane: none exits before the barriers below
  if (t == 0) {
    s_count = 0;
    s_max = -1;
  }
  s_tile[t] = 1000 * blk + t;
  dyn[t] = 0.5f * t;
  __syncthreads();
  o[0] = t + 1000 * (blockDim.x + 100 * blockDim.y + 10000 * blockDim.z);
  o[1] = blk + 1000 * (gridDim.x + 100 * gridDim.y + 10000 * gridDim.z);
  o[2] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  o[3] = __any_sync(0xffffffffu, lane == 7) + 2 * __all_sync(0xffffffffu, lane < 31) +
         4 * __all_sync(0xffffffffu, lane < 32) + 8 * __any_sync(0xffffffffu, 0);
  const int v = lane * 10 + blk;
  o[4] = __shfl_sync(0xffffffffu, v, 31 - lane);
  o[5] = __shfl_up_sync(0xffffffffu, v, 1, 8);
  o[6] = __shfl_down_sync(0xffffffffu, v, 2, 16);
  o[7] = __shfl_xor_sync(0xffffffffu, v, 5);
  float s = static_cast<float>(lane);
  for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
  o[8] = static_cast<long long>(s);
  o[9] = s_tile[(t + 1) % nthreads];
  atomicAdd(&s_count, 1u);
  atomicMax(&s_max, t * 7 % 50);
  __syncthreads();
  o[10] = static_cast<long long>(s_count) * 1000 + s_max;
  o[11] = static_cast<long long>(dyn[nthreads - 1 - t] * 2.f);
  o[12] = __popc(t) + 100 * __ffs(t) + 10000 * __clz(t + 1);
  const bool bits_ok = __float_as_uint(1.5f) == 0x3fc00000u && __uint_as_float(0x40000000u) == 2.f &&
                       __float_as_int(-2.f) == static_cast<int>(0xc0000000u);
  o[13] = bits_ok ? static_cast<long long>(__half2float(__float2half(t * 0.25f)) * 4.f) +
                        1000 * static_cast<long long>(__bfloat162float(__float2bfloat16(t + 0.5f)))
                  : -1;
  if (lane < 16) {
    __syncwarp(0x0000ffffu);
    o[14] = __ballot_sync(0x0000ffffu, lane & 1);
  } else {
    o[14] = 0;
  }
  atomicAdd(counter, 1LL);
  o[15] = active;
}

// A missing __syncthreads: each thread reads what a thread of the other warp
// wrote, with only a warp barrier in between. Right in thread order, wrong
// under some schedules (shared memory starts as 0xff bytes: -1; dynamic
// shared memory, which the ASan build refills per block too).
__global__ void missing_sync_kernel(int* out) {
  extern __shared__ int s[];
  const int t = threadIdx.x;
  s[t] = t + 1;
  __syncwarp();
  out[t] = s[(t + 32) % 64];
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void barrier_after_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void exited_lane_mask_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}

__global__ void full_ballot_kernel(int* out) { out[threadIdx.x] = __ballot_sync(0xffffffffu, 1); }

__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x % 32 == 0) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1;
}

__global__ void mismatched_ops_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
  } else {
    out[threadIdx.x] = __any_sync(0xffffffffu, 1);
  }
}

__global__ void mask_without_self_kernel(int* out) { out[threadIdx.x] = __ballot_sync(0x1u, 1); }

__global__ void shfl_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1, 8, 32);
}

__global__ void shared_overflow_kernel(int* out) {
  __shared__ int s_buf[64];
  s_buf[threadIdx.x + 1] = 1;  // thread 63 writes one past the end
  __syncthreads();
  out[threadIdx.x] = s_buf[threadIdx.x];
}

__global__ void trap_kernel(int* out) {
  if (threadIdx.x == 7) __trap();
  out[threadIdx.x] = 1;
}

// 16-byte loads through __ldg: thread t sums the uint4 at in + 4t.
__global__ void vector_load_kernel(const unsigned int* in, int* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in) + threadIdx.x);
  out[threadIdx.x] = static_cast<int>(v.x + v.y + v.z + v.w);
}

// Thread 9 loads a uint4 from 4 bytes past a 16-byte boundary: a fault on the
// GPU, an error here.
__global__ void misaligned_load_kernel(const unsigned int* in, int* out) {
  const unsigned int* p = in + 4 * threadIdx.x + (threadIdx.x == 9 ? 1 : 0);
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  out[threadIdx.x] = static_cast<int>(v.x);
}

// Thread 5 states a 16-byte access 4 bytes past a 16-byte boundary; the
// others' accesses are aligned.
__global__ void misaligned_kernel(int* out) {
  const char* p = reinterpret_cast<const char*>(out) + (threadIdx.x == 5 ? 4 : 0);
  DUALENC_CHECK_ALIGNED(p, 16);
  out[threadIdx.x] = 1;
}

// A 64 KiB dynamic buffer (over the 48 KiB default: the launch needs the
// kernel's cudaFuncSetAttribute opt-in): out[t] = 63 - t through its far end.
__global__ void big_shared_kernel(int* out) {
  extern __shared__ int big[];
  big[16 * 1024 - 64 + threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = big[16 * 1024 - 1 - threadIdx.x];
}

// Runs self-test `name`; returns the kernel's output (primitives: kFields per
// thread, then the global counter).
std::vector<int64_t> run(const std::string& name) {
  if (name == "primitives") {
    const dim3 grid(2, 3), block(48, 2);
    const int threads = 96, blocks = 6;
    std::vector<long long> out(static_cast<size_t>(threads * blocks * kFields), -7);
    long long counter = 0;
    DUALENC_LAUNCH(primitives_kernel, grid, block, threads * sizeof(float), 0)(out.data(), &counter);
    std::vector<int64_t> r(out.begin(), out.end());
    r.push_back(counter);
    return r;
  }
  std::vector<int> out(64, 0);
  alignas(16) static unsigned int words[64 * 4 + 4];
  for (unsigned int i = 0; i < 64 * 4 + 4; ++i) words[i] = i;
  if (name == "vector_load") {
    DUALENC_LAUNCH(vector_load_kernel, 1, 64, 0, 0)(words, out.data());
  } else if (name == "misaligned_load") {
    DUALENC_LAUNCH(misaligned_load_kernel, 1, 64, 0, 0)(words, out.data());
  } else if (name == "missing_sync") {
    DUALENC_LAUNCH(missing_sync_kernel, 1, 64, 64 * sizeof(int), 0)(out.data());
  } else if (name == "divergent_barrier") {
    DUALENC_LAUNCH(divergent_barrier_kernel, 1, 64, 0, 0)(out.data());
  } else if (name == "barrier_after_exit") {
    DUALENC_LAUNCH(barrier_after_exit_kernel, 1, 64, 0, 0)(out.data());
  } else if (name == "exited_lane_mask") {
    DUALENC_LAUNCH(exited_lane_mask_kernel, 1, 64, 0, 0)(out.data());
  } else if (name == "partial_warp_mask") {
    DUALENC_LAUNCH(full_ballot_kernel, 1, 40, 0, 0)(out.data());
  } else if (name == "deadlock") {
    DUALENC_LAUNCH(deadlock_kernel, 1, 64, 0, 0)(out.data());
  } else if (name == "mismatched_ops") {
    DUALENC_LAUNCH(mismatched_ops_kernel, 1, 64, 0, 0)(out.data());
  } else if (name == "mask_without_self") {
    DUALENC_LAUNCH(mask_without_self_kernel, 1, 64, 0, 0)(out.data());
  } else if (name == "shfl_outside_mask") {
    DUALENC_LAUNCH(shfl_outside_mask_kernel, 1, 32, 0, 0)(out.data());
  } else if (name == "shared_overflow") {
    DUALENC_LAUNCH(shared_overflow_kernel, 1, 64, 0, 0)(out.data());
  } else if (name == "trap") {
    DUALENC_LAUNCH(trap_kernel, 1, 64, 0, 0)(out.data());
  } else if (name == "misaligned") {
    alignas(16) static int buf[64];
    DUALENC_LAUNCH(misaligned_kernel, 1, 64, 0, 0)(buf);
  } else if (name == "big_shared_opt_in") {
    cudaFuncSetAttribute(big_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    DUALENC_LAUNCH(big_shared_kernel, 1, 64, 64 * 1024, 0)(out.data());
  } else if (name == "big_shared") {  // no opt-in for this kernel
    DUALENC_LAUNCH(missing_sync_kernel, 1, 64, 64 * 1024, 0)(out.data());
  } else if (name == "bad_block") {
    DUALENC_LAUNCH(missing_sync_kernel, 1, 2048, 64 * sizeof(int), 0)(out.data());
  } else {
    throw std::invalid_argument("emu selftest: unknown case '" + name + "'");
  }
  return std::vector<int64_t>(out.begin(), out.end());
}

}  // namespace dualenc_fast::emu_selftest
