// The batch-tiled forward of sparse_decode on CUDA (the "tiled" form, chosen
// by use_tiled_forward in strategy.h):
//   out[b] = bias + sum_j values[b, j] * W[indices[b, j]]
// for codes of high density, where the gather form (gather_sum: every pair
// re-reads its weight row from L2/HBM) reads B*k*d elements and the dense
// form multiplies the whole [B, F] code.
//
// Host preparation (ATen ops on the device, no host round-trip): each row's
// pairs sorted ascending by feature (a stable sort: repeated features keep
// their order j), the values gathered in that order, and for each row the
// position of its first pair in each chunk of C features (a searchsorted of
// the chunk boundaries): starts [B, chunks + 1] int32.
//
// Kernel: block (tile, slice) owns kTiledRows = 256 batch rows and a slice of
// S = 128 columns (64 for float64). Its 16 warps own 16 rows each; lane l holds
// columns l*LC .. l*LC + LC - 1 of the slice (LC = 4; 2 for float64) for each
// of its warp's rows: 64 float32 accumulators in registers. The weight table's
// [C, S] chunks stream through two shared-memory buffers: while chunk c is
// consumed from one, chunk c + 1 is loaded (16-byte loads where the rows
// allow; half of it issued before the first half of the rows' arithmetic and
// stored after it, the other half around the second half of the rows) and
// stored into the other, one barrier per chunk. For chunk c each warp walks its rows in order; a row's pairs in
// the chunk, [starts[b][c], starts[b][c + 1]), are loaded by its lanes (one
// pair each, up to 32 at a time, the next row's first batch issued before the
// current row's arithmetic) and broadcast by shuffles; for each pair every
// lane reads LC consecutive elements of the staged weight row (a warp reads
// one contiguous row: no bank conflicts, no swizzle needed) and adds
// value * W into its accumulators.
//
// Summation order of out[b, c] (fixed, independent of the schedule): the bias
// (or 0), then the row's pairs in ascending feature order, pairs of one
// feature in increasing j; one float32 (float64 for double) multiply-add each,
// rounded to the output dtype once. It differs from gather_sum's order (j
// order), so the two forms agree within rounding, and each is bitwise
// reproducible.
//
// Shared memory: two buffers of kTiledBufferBytes (48 KiB each; dynamic, over
// the 48 KiB default, so each launch first raises the kernel's limit). C = 192
// features in 16-bit dtypes, 96 in float32 and float64.
//
// Cost at P in bfloat16 (B = 4096, d = 3200, F = 50000, k = 1024, 16 tiles x
// 25 slices = 400 blocks of 512 threads, one per SM: 128 registers, 96 KiB of
// shared memory; H100 figures of KERNELS.md and the review): L2 -> shared
// memory (B/R)*F*d*2 B = 5.1 GB, 0.7-0.9 ms; shared-memory reads B*k*d*2 B =
// 26.8 GB, ~0.9 ms. Issue (nvcc 13.0 sm_90 SASS): the pair loop, unrolled by
// 4, is 59 instructions per 4 pairs (8 SHFL, 4 LDS.64, 16 conversions, 16
// FFMA, addresses, loop), 14.75 per (pair, slice) x B*k*d/128 = 105 M: 1.55 G,
// plus ~15 per (row, chunk, slice) x 27 M: 0.4 G; ~1.95 G at 927 G
// warp-instructions/s is ~2.1 ms, the bound (shuffles: 2 per (pair, slice)
// at one warp-shuffle per SM-cycle, 0.9 ms). float32: 43 per 4 pairs, C = 96:
// 1.13 G + 0.8 G, also ~2 ms (L2 10.2 GB, shared memory 53.7 GB, 1.8 ms).
// The review's byte-only estimate is 0.75-1 ms in bf16. It replaces the
// gather's 26.8 GB (bf16, ~10 ms) / 53.7 GB (fp32, 15-22 ms) of random weight
// rows, or the dense form (bf16 1.64-2.0 ms, fp32 SIMT 22-26 ms). sm_90: no
// spills except 4 bytes in the float32 16-byte path. Host preparation: a
// segmented sort of the [B, k] indices, a gather and a searchsorted of
// B*(chunks + 1) boundaries (B*(chunks + 1)*4 B = 4.3 MB at P), small
// against the kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "ops/cuda/launch.cuh"
#include "ops/cuda/primitives.cuh"
#include "ops/cuda/tiled_decode.h"
#include "ops/grid.h"
#include "strategy.h"

namespace dualenc_fast::cuda {

constexpr int kTiledWarps = 16;
constexpr int kTiledThreads = kTiledWarps * kWarp;  // 512
constexpr int kTiledRowsPerWarp = static_cast<int>(kTiledRows) / kTiledWarps;
static_assert(kTiledRowsPerWarp * kTiledWarps == kTiledRows && kTiledRowsPerWarp <= kWarp,
              "each lane below kTiledRowsPerWarp holds one row's chunk bounds");
constexpr int kTiledBufferBytes = 48 * 1024;

// Columns per lane, slice width, features per chunk.
template <typename scalar_t>
constexpr int kTiledLaneCols = sizeof(scalar_t) > 4 ? 2 : 4;
template <typename scalar_t>
constexpr int kTiledSlice = kWarp * kTiledLaneCols<scalar_t>;
template <typename scalar_t>
constexpr int kTiledChunk = kTiledBufferBytes / (kTiledSlice<scalar_t> * static_cast<int>(sizeof(scalar_t)));
static_assert(kTiledChunk<float> >= kTiledMinChunk && kTiledChunk<double> >= kTiledMinChunk &&
                  kTiledChunk<c10::BFloat16> >= kTiledMinChunk,
              "strategy.h bounds the tiled form's pair offsets by its narrowest chunk (kTiledMinChunk)");

template <typename scalar_t, int VW>
__global__ void __launch_bounds__(kTiledThreads) tiled_decode_kernel(
    const scalar_t* __restrict__ vals,  // [B, k] each row's values in feature order
    const int* __restrict__ feats,      // [B, k] each row's features, ascending
    const int* __restrict__ starts,     // [B, chunks + 1] each row's first position in each chunk
    const scalar_t* __restrict__ W,     // [F, d]
    const scalar_t* __restrict__ bias,  // [d] or nullptr
    scalar_t* __restrict__ out,         // [B, d]
    int64_t B, int64_t k, int64_t F, int64_t d, int chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, VW>;
  constexpr int LC = kTiledLaneCols<scalar_t>;
  constexpr int S = kTiledSlice<scalar_t>;
  constexpr int C = kTiledChunk<scalar_t>;
  constexpr int RW = kTiledRowsPerWarp;
  constexpr int kVecs = C * S / VW / kTiledThreads;  // staged vectors per thread and chunk
  static_assert(kVecs * VW * kTiledThreads == C * S, "a chunk is whole vectors per thread");
  constexpr int kHalf = VW == 1 ? 1 : kVecs / 2;
  static_assert(VW == 1 || kVecs % 2 == 0, "the vector path stages a chunk in two halves");
  static_assert(S % VW == 0, "a vector stays inside the slice");
  static_assert(LC % 2 == 0 && sizeof(Vec<scalar_t, LC>) >= LC / 2 * sizeof(unsigned), "whole 32-bit words per lane");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* sW = reinterpret_cast<scalar_t*>(smem_raw);  // [2][C][S]

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTiledRows + warp * RW;  // the warp's first row
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * S;                          // the slice's first column
  const int64_t col = s0 + lane * LC;                                               // this lane's first column

  // staging: element e = (v * threads + t) * VW of a chunk is (feature e / S,
  // column e % S); features past F and columns past d read as zeros
  // (in two halves of kHalf vectors, h = 0 or 1: half the registers in flight)
  auto load_chunk = [&](int c, int h, vec_t (&reg)[kHalf]) {
#pragma unroll
    for (int u = 0; u < kHalf; ++u) {
      const int v = h * kHalf + u;
      const int e = (v * kTiledThreads + static_cast<int>(threadIdx.x)) * VW;
      const int64_t f = static_cast<int64_t>(c) * C + e / S, gc = s0 + e % S;
      reg[u] = f < F && gc < d ? load_vec<VW>(W + f * d + gc) : vec_t{};
    }
  };
  auto store_chunk = [&](int c, int h, const vec_t (&reg)[kHalf]) {
    scalar_t* buf = sW + (c & 1) * (C * S);
#pragma unroll
    for (int u = 0; u < kHalf; ++u) {
      const int v = h * kHalf + u;
      scalar_t* p = buf + (v * kTiledThreads + static_cast<int>(threadIdx.x)) * VW;
      DUALENC_CHECK_ALIGNED(p, sizeof(vec_t));
      *reinterpret_cast<vec_t*>(p) = reg[u];
    }
  };
  // plain loads (VW = 1): each element stored as it arrives, no register copy
  // of the chunk (that would be C * S / threads registers)
  auto stage_direct = [&](int c) {
    scalar_t* buf = sW + (c & 1) * (C * S);
    for (int e = threadIdx.x; e < C * S; e += kTiledThreads) {
      const int64_t f = static_cast<int64_t>(c) * C + e / S, gc = s0 + e % S;
      buf[e] = f < F && gc < d ? W[f * d + gc] : scalar_t(0);
    }
  };

  acc_t acc[RW][LC];
#pragma unroll
  for (int e = 0; e < LC; ++e) {
    const acc_t b0 = bias != nullptr && col + e < d ? static_cast<acc_t>(bias[col + e]) : acc_t(0);
#pragma unroll
    for (int r = 0; r < RW; ++r) acc[r][e] = b0;
  }

  // lane r < RW holds row row0 + r's bounds: lo = its first pair in chunk c,
  // hi = its first pair in chunk c + 1 (hi2: chunk c + 2, loaded a chunk early)
  const bool bound_lane = lane < RW && row0 + lane < B;
  const int* my_starts = starts + (bound_lane ? (row0 + lane) * (chunks + 1) : 0);
  int lo = bound_lane ? my_starts[0] : 0;
  int hi = bound_lane && chunks > 0 ? my_starts[1] : 0;

  constexpr unsigned kFull = 0xffffffffu;
  // iteration -1 only stages chunk 0; iteration c >= 0 adds chunk c while it
  // stages chunk c + 1; one barrier (the kernel's only one) ends each iteration
  for (int c = -1; c < chunks; ++c) {
    if (c < 0) {
      if (chunks > 0) {
        if constexpr (VW == 1) {
          stage_direct(0);
        } else {
          vec_t reg[kHalf];
          for (int h = 0; h < 2; ++h) {
            load_chunk(0, h, reg);
            store_chunk(0, h, reg);
          }
        }
      }
    } else {
      const int hi2 = bound_lane && c + 2 <= chunks ? my_starts[c + 2] : 0;
      const bool next = c + 1 < chunks;
      vec_t reg[kHalf];  // the vector path: half of chunk c + 1, loaded before a half of the rows, stored after
      if constexpr (VW == 1) {
        (void)reg;
        if (next) stage_direct(c + 1);  // the other buffer: nobody reads it during chunk c
      } else {
        if (next) load_chunk(c + 1, 0, reg);
      }
      const scalar_t* buf = sW + (c & 1) * (C * S) + lane * LC;
      const int f0 = c * C;
      // up to 32 pairs of row r from position q of its chunk, one per lane:
      // the staged row's offset and the value (zeros past the chunk)
      auto meta = [&](int r, int p0, int n, int q, int& off, acc_t& val) {
        off = 0;
        val = acc_t(0);
        if (q + lane < n) {
          const int64_t p = (row0 + r) * k + p0 + q + lane;
          off = (feats[p] - f0) * S;
          val = static_cast<acc_t>(vals[p]);
        }
      };
      int p0_next = __shfl_sync(kFull, lo, 0);
      int n_next = __shfl_sync(kFull, hi, 0) - p0_next;
      int off_next;
      acc_t val_next;
      meta(0, p0_next, n_next, 0, off_next, val_next);
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        if constexpr (VW != 1) {
          if (r == RW / 2 && next) {  // a compile-time row: the loop is unrolled
            store_chunk(c + 1, 0, reg);
            load_chunk(c + 1, 1, reg);
          }
        }
        const int p0 = p0_next, n = n_next;  // warp-uniform
        int off = off_next;
        acc_t val = val_next;
        if (r + 1 < RW) {  // the next row's first batch, in flight during this row's arithmetic
          p0_next = __shfl_sync(kFull, lo, r + 1);
          n_next = __shfl_sync(kFull, hi, r + 1) - p0_next;
          meta(r + 1, p0_next, n_next, 0, off_next, val_next);
        }
        for (int q = 0; q < n; q += kWarp) {
          if (q > 0) meta(r, p0, n, q, off, val);
          const int m = n - q < kWarp ? n - q : kWarp;
#pragma unroll 4
          for (int j = 0; j < m; ++j) {
            const int o = __shfl_sync(kFull, off, j);
            const acc_t a = __shfl_sync(kFull, val, j);
            const Vec<scalar_t, LC> w = load_vec<LC>(buf + o);
            if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
              // two bfloat16 per 32-bit word: the low one shifted up, the high
              // one masked, one instruction each (the same floats as the cast)
              unsigned u[LC / 2];
              std::memcpy(u, &w, sizeof(u));
#pragma unroll
              for (int e = 0; e < LC / 2; ++e) {
                acc[r][2 * e] += a * __uint_as_float(u[e] << 16);
                acc[r][2 * e + 1] += a * __uint_as_float(u[e] & 0xffff0000u);
              }
            } else {
#pragma unroll
              for (int e = 0; e < LC; ++e) acc[r][e] += a * static_cast<acc_t>(w.v[e]);
            }
          }
        }
      }
      if constexpr (VW != 1) {
        if (next) store_chunk(c + 1, 1, reg);
      }
      lo = hi;
      hi = hi2;
    }
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < RW; ++r) {
    const int64_t b = row0 + r;
    if (b >= B) break;
#pragma unroll
    for (int e = 0; e < LC; ++e) {
      if (col + e < d) out[b * d + col + e] = static_cast<scalar_t>(acc[r][e]);
    }
  }
}

at::Tensor tiled_decode(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  const auto v = values.contiguous();
  const auto W = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const auto bvec = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  auto out = at::empty({B, d}, v.options());
  if (B == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "tiled_decode", [&] {
    constexpr int C = kTiledChunk<scalar_t>;
    constexpr int S = kTiledSlice<scalar_t>;
    const int64_t chunks = ceil_div(F, C);
    TORCH_CHECK(F <= INT32_MAX - C && k <= INT32_MAX, "dualenc_fast: the tiled sparse_decode needs F and k below 2^31, "
                "got F = ", F, ", k = ", k);
    at::Tensor feats, sv, starts;
    if (k > 0) {
      const auto sorted = at::sort(indices.contiguous(), /*stable=*/true, /*dim=*/1, /*descending=*/false);
      const at::Tensor& sidx = std::get<0>(sorted);  // [B, k]
      feats = sidx.to(at::kInt);
      sv = at::gather(v, 1, std::get<1>(sorted));
      const auto bounds = at::mul(at::arange(chunks + 1, sidx.options()), C).expand({B, chunks + 1}).contiguous();
      starts = at::searchsorted(sidx, bounds, /*out_int32=*/true);  // [B, chunks + 1]
    } else {
      feats = at::empty({B, 0}, indices.options().dtype(at::kInt));
      sv = v;
      starts = at::zeros({B, chunks + 1}, indices.options().dtype(at::kInt));
    }
    constexpr int kVec = kVecWidth<scalar_t>;
    const bool vec = vector_rows(W.const_data_ptr<scalar_t>(), d, kVec);
    constexpr int smem = 2 * kTiledBufferBytes;
    auto stream = c10::cuda::getCurrentCUDAStream();
    auto launch = [&](auto width) {
      constexpr int VW = decltype(width)::value;
      // over the 48 KiB default: raise the kernel's limit (a cheap host call)
      C10_CUDA_CHECK(cudaFuncSetAttribute(tiled_decode_kernel<scalar_t, VW>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      const dim3 grid(checked_grid(ceil_div(B, kTiledRows), "tiled_decode_kernel"),
                      checked_grid_y(ceil_div(d, S), "tiled_decode_kernel"));
      DUALENC_LAUNCH((tiled_decode_kernel<scalar_t, VW>), grid, kTiledThreads, smem, stream)(
          sv.const_data_ptr<scalar_t>(), feats.const_data_ptr<int>(), starts.const_data_ptr<int>(),
          W.const_data_ptr<scalar_t>(), has_bias ? bvec.const_data_ptr<scalar_t>() : nullptr,
          out.mutable_data_ptr<scalar_t>(), B, k, F, d, static_cast<int>(chunks));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return out;
}

}  // namespace dualenc_fast::cuda
