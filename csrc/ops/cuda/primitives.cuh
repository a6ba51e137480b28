// CUDA versions of the three primitives (see csrc/ops/cpu/primitives.h):
//   gather_sum   out[b]  = bias + sum_j coef[b, j] * W[idx[b, j]]
//   row_dot      dv[b,j] = <g[b], W[idx[b, j]]>
//   FeatureCsr + scatter_rows: dW[i] = sum over pairs with idx == i of coef * y[b]
//     (fixed-size work items and a deterministic two-stage sum; see FeatureCsr)
//   FeatureCsr + dot_scatter_rows: row_dot's dv and scatter_rows' dW of one
//     gather-sum in one feature-major pass (each weight row read once)
// Every launch goes on the current stream and is followed by
// C10_CUDA_KERNEL_LAUNCH_CHECK(); accumulation is in at::opmath_type<scalar_t>.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "ops/cuda/launch.cuh"
#include "ops/grid.h"

namespace dualenc_fast::cuda {

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int threads_for(int64_t width) {
  // a multiple of the warp size, at most 256, enough to cover `width` once
  int64_t t = std::min<int64_t>(256, std::max<int64_t>(kWarp, ceil_div(width, kWarp) * kWarp));
  return static_cast<int>(t);
}

// A multiple of the warp size covering `width` once, up to 1024 threads (one
// pass for the FM kernels' K columns: K = 300 runs 320 threads, not 256 + 44).
inline int threads_cover(int64_t width) {
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(kWarp, ceil_div(width, kWarp) * kWarp)));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// One block per row b; threads stride over the d columns (coalesced row reads).
template <typename scalar_t>
__global__ void gather_sum_kernel(const scalar_t* __restrict__ coef,  // [B, k]
                                  const int64_t* __restrict__ idx,    // [B, k]
                                  const scalar_t* __restrict__ W,     // [F, d]
                                  const scalar_t* __restrict__ bias,  // [d] or nullptr
                                  scalar_t* __restrict__ out,         // [B, d]
                                  int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const scalar_t* cb = coef + b * k;
  const int64_t* ib = idx + b * k;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    acc_t acc = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
    for (int64_t j = 0; j < k; ++j) {
      acc += static_cast<acc_t>(cb[j]) * static_cast<acc_t>(W[ib[j] * d + c]);
    }
    out[b * d + c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
void gather_sum(const scalar_t* coef, const int64_t* idx, const scalar_t* W, const scalar_t* bias,
                scalar_t* out, int64_t B, int64_t k, int64_t d) {
  if (B == 0 || d == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  DUALENC_LAUNCH(gather_sum_kernel<scalar_t>, checked_grid(B, "gather_sum_kernel"), threads_for(d), 0, stream)(
      coef, idx, W, bias, out, k, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One warp per (b, j) pair; lanes stride over d, then a warp reduction.
template <typename scalar_t>
__global__ void row_dot_kernel(const scalar_t* __restrict__ g,    // [B, d]
                               const int64_t* __restrict__ idx,   // [B, k]
                               const scalar_t* __restrict__ W,    // [F, d]
                               scalar_t* __restrict__ out,        // [B, k]
                               int64_t n_pairs, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= n_pairs) return;
  const scalar_t* gb = g + (p / k) * d;
  const scalar_t* w = W + idx[p] * d;
  acc_t s = 0;
  for (int64_t c = lane; c < d; c += kWarp) s += static_cast<acc_t>(gb[c]) * static_cast<acc_t>(w[c]);
  s = warp_sum(s);
  if (lane == 0) out[p] = static_cast<scalar_t>(s);
}

template <typename scalar_t>
void row_dot(const scalar_t* g, const int64_t* idx, const scalar_t* W, scalar_t* out, int64_t B,
             int64_t k, int64_t d) {
  const int64_t n_pairs = B * k;
  if (n_pairs == 0) return;
  constexpr int threads = 256;
  const int64_t blocks = ceil_div(n_pairs, threads / kWarp);
  auto stream = c10::cuda::getCurrentCUDAStream();
  DUALENC_LAUNCH(row_dot_kernel<scalar_t>, checked_grid(blocks, "row_dot_kernel"), threads, 0, stream)(
      g, idx, W, out, n_pairs, k, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Transpose of a sparse code, built on the device, cut into work items.
// Pairs are sorted by feature with a stable sort (a feature's pairs in
// increasing pair id); rowptr[i] = the first sorted position holding a feature
// >= i (a binary search; no host round-trip, unlike a bincount). rows holds the
// batch row (int32) of each sorted pair, computed once here, so no kernel
// divides by k.
//
// Work items: each feature's pair list is cut into items of at most
// kPairsPerItem consecutive pairs (an empty feature still has one item, which
// writes its zero row); item_ptr[i] = the first item of feature i. A kernel
// runs one block per (item, column slice), so a feature that fires on every
// row is spread over ceil(B / kPairsPerItem) blocks instead of one. A feature
// with one item writes its result directly; a feature with several writes one
// acc_t partial row per item (part_ptr[i] = its first partial row) and
// reduce_partials sums them in item order: the result depends only on the
// code, never on the schedule (bitwise the same run to run, no atomics).
// multi_cum[i] = the number of features <= i with several items;
// item_feature and multi_feature map each block of the two stages to its
// feature (searchsorted once per CSR, not a search in every block).
constexpr int64_t kPairsPerItem = 256;

struct FeatureCsr {
  at::Tensor rowptr;     // [F + 1] int64
  at::Tensor pairs;      // [nnz] int64, pair ids b * k + j in feature order
  at::Tensor rows;       // [nnz] int32, the batch row b of each sorted pair
  at::Tensor item_ptr;   // [F + 1] int64
  at::Tensor part_ptr;   // [F + 1] int64
  at::Tensor multi_cum;  // [F] int64 (inclusive count)
  at::Tensor item_feature;   // [item_bound()] int64: each item's feature (F past the last item)
  at::Tensor multi_feature;  // [multi_bound()] int64: the m-th feature with several items (F past the last)
  int64_t F = 0, nnz = 0;

  FeatureCsr(const at::Tensor& idx, int64_t F_) : F(F_) {  // idx [B, k] (or flat) int64
    const auto flat = idx.reshape({-1});
    nnz = flat.numel();
    const int64_t k = idx.dim() >= 2 ? std::max<int64_t>(1, idx.size(-1)) : 1;
    auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    pairs = std::get<1>(sorted);
    rowptr = at::searchsorted(std::get<0>(sorted), at::arange(F + 1, flat.options()));
    rows = at::floor_divide(pairs, k).to(at::kInt);
    const auto cnt = at::sub(rowptr.narrow(0, 1, F), rowptr.narrow(0, 0, F));  // [F]
    const auto items = at::clamp_min(at::floor_divide(at::add(cnt, kPairsPerItem - 1), kPairsPerItem), 1);
    const auto multi = at::gt(cnt, kPairsPerItem);
    const auto zero = at::zeros({1}, rowptr.options());
    item_ptr = at::cat({zero, at::cumsum(items, 0)});
    part_ptr = at::cat({zero, at::cumsum(at::mul(items, multi), 0)});
    multi_cum = at::cumsum(multi, 0, at::kLong);
    // the kernels' block -> feature maps, one binary search per block here
    // instead of a chain of dependent loads in every block
    const auto opt = rowptr.options();
    item_feature = at::sub(at::searchsorted(item_ptr, at::arange(item_bound(), opt), false, /*right=*/true), 1);
    multi_feature = at::searchsorted(multi_cum, at::arange(multi_bound(), opt), false, /*right=*/true);
  }

  // grid bounds that need no host round-trip: items <= F + nnz / kPairsPerItem;
  // features with several items <= nnz / (kPairsPerItem + 1); their partial
  // rows <= 2 nnz / kPairsPerItem
  int64_t item_bound() const { return F + nnz / kPairsPerItem; }
  // Never shared while the stream is being captured into a CUDA graph
  // (csr_share.h): a replay runs on new data that no version counter records,
  // and a transpose built during capture lives in the graph's memory pool.
  static bool shareable_now() {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  }
  int64_t multi_bound() const { return std::max<int64_t>(1, nnz / (kPairsPerItem + 1)); }
  int64_t partial_rows_bound() const { return 2 * nnz / kPairsPerItem + 1; }
};

// One work item of a FeatureCsr: its feature, its pair range [q0, q1), and
// where its result goes (a partial row, or -1 for the feature's row itself).
struct CsrItem {
  int64_t feature, q0, q1, partial;
};

__device__ __forceinline__ bool csr_item(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ item_ptr,
                                         const int64_t* __restrict__ part_ptr,
                                         const int64_t* __restrict__ item_feature, int64_t F, int64_t item,
                                         CsrItem& it) {
  const int64_t i = item_feature[item];
  if (i >= F) return false;
  const int64_t chunk = item - item_ptr[i];
  it.feature = i;
  it.q0 = rowptr[i] + chunk * kPairsPerItem;
  const int64_t end = rowptr[i + 1];
  it.q1 = end < it.q0 + kPairsPerItem ? end : it.q0 + kPairsPerItem;
  it.partial = part_ptr[i + 1] > part_ptr[i] ? part_ptr[i] + chunk : -1;
  return true;
}

// ---------------------------------------------------------------- feature-major passes
// scatter_rows and dot_scatter_rows run one block per work item of a
// FeatureCsr (scatter_rows: per (item, column slice)). The item's pairs (the
// offset of each pair's row in y, and its coefficient) are staged in shared
// memory; then each thread walks them in order for its own columns.
//
// Columns: a thread owns kRowCols columns per pass over a slice, as M vectors
// of VW consecutive columns: one 16-byte load each (VW = kVecWidth) when d is a
// multiple of VW and the rows' base pointers are 16-byte aligned, else VW = 1
// (plain loads, any d, any alignment). Vector m of thread t in pass s is vector
// (s * M + m) * blockDim.x + t of the row, so a warp's loads are consecutive.
// The pair loop is unrolled: the loads of kPairsInFlight pairs are issued
// before their multiply-adds, so M * kPairsInFlight loads are in flight per
// thread. Each column is still summed pair by pair in item order, and each
// partial dot in a fixed order (see below): the results depend only on the
// code and the plan (d, dtype, alignment), never on the schedule.
//
// Cost at the paper's shape P in float32 (B = 4096, d = 3200, F = 50000,
// k = 1024: nnz = 4.19 M pairs, about 84 per feature), H100 figures of
// KERNELS.md and the review (L2 -> SM 5.5-7 TB/s, HBM 2.4-3 TB/s, issue
// 132 SMs x 4 x 1.755 GHz = 927 G warp-instructions/s); instruction and
// register counts from nvcc 13.0's sm_90 SASS of these kernels:
// - scatter_rows: 8 columns per thread (2 x 16-byte loads), 2 slices of 224
//   threads (1792 columns each; 89% of the lanes busy), 56 registers: 5
//   blocks per SM. Every pair reads its y row once: nnz * d * 4 B = 53.7 GB,
//   mostly from L2 (the blocks running at once share one column slice of y:
//   4096 x 1792 x 4 B = 29 MB, under the 50 MB L2): 7.7-9.8 ms. Issue: the
//   pair loop is 113 instructions per 4 pairs (8 loads, 32 FMAs), 28 per
//   (pair, warp of 256 columns), x 12.5 warps x nnz = 1.5 G: 1.6 ms. In
//   flight: 4 pairs x 2 x 16 B = 128 B per thread, ~140 KB per SM, over the
//   ~36 KB that L2 latency (~800 cycles) x bandwidth (~45 B/cycle/SM) needs:
//   L2-bound, 8-10 ms, where one 4-byte load in flight per thread and pair
//   was latency-bound at >= 21 ms. bfloat16: 26.8 GB, 3.8-4.9 ms.
// - dot_scatter_rows: 16 columns per thread (4 x 16-byte loads), one pass of
//   224 threads over the whole row, 99 registers: 2 blocks per SM, 128 B in
//   flight per thread (57 KB per SM). The W row is read once per item
//   (0.64 GB in all), each pair's g row once (53.7 GB, from L2 and HBM: g is
//   52 MB), dW written once (0.64 GB): 8-12 ms. Issue: ~105 instructions
//   per (pair, warp of 512 columns) (4 loads, 32 FMAs for the dot and dW, a
//   5-step warp sum), x 7 warps x nnz = 3.1 G: 3.3 ms, under the memory time.
//   It replaces row_dot (a W row per pair: 53.7 GB of random rows of a
//   640 MB table, from HBM: 18-22 ms) plus scatter_rows (>= 21 ms).
// At S (B = 8192, d = 2304, F = 65536, k = 64: nnz = 0.52 M, ~8 pairs per
// feature, one item each) the pairs' g rows are 4.8 GB in float32 (g is
// 75 MB: L2 and HBM) and W and dW 0.6 GB each: dot_scatter_rows ~1.5-2 ms,
// where row_dot streamed another 4.8 GB of random W rows and scatter_rows
// the g rows again with one load in flight (~4 ms together). Each block's
// set-up is ~4 dependent loads (item -> feature -> pair range -> pairs ->
// coefficients), hidden by the other resident blocks.
constexpr int kMaxRowThreads = 256;
constexpr int kMaxRowWarps = kMaxRowThreads / kWarp;

// Elements in one 16-byte load.
template <typename scalar_t>
constexpr int kVecWidth = sizeof(scalar_t) >= 16 ? 1 : static_cast<int>(16 / sizeof(scalar_t));

// Columns per thread and pass: scatter_rows 8 (4 for 8-byte types);
// dot_scatter_rows, which also holds the weight row's slice in registers, 16 (8).
template <typename scalar_t, bool kDot>
constexpr int kRowCols = (kDot ? 16 : 8) / (sizeof(scalar_t) > 4 ? 2 : 1);

// Pairs whose loads are issued before their multiply-adds.
template <bool kDot>
constexpr int kPairsInFlight = kDot ? 2 : 4;

// N consecutive elements, loaded at once (aligned to their size).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename scalar_t>
__device__ __forceinline__ Vec<scalar_t, N> load_vec(const scalar_t* p) {
  DUALENC_CHECK_ALIGNED(p, sizeof(Vec<scalar_t, N>));
  return *reinterpret_cast<const Vec<scalar_t, N>*>(p);
}

// Block (item, slice) of scatter_rows (kDot false): dW's columns of slice
// blockIdx.y summed over the item's pairs, dsum[i] (slice 0). Block (item) of
// dot_scatter_rows (kDot): passes over every slice; per pair, each warp's
// partial dot with the weight row (its lanes' columns in order, then a warp
// sum) is added, pass after pass, into s_dot[warp][pair]; at the end
// dv = the sum of s_dot over the warps in order. dW == nullptr: dv only.
template <typename scalar_t, int VW, bool kDot>
__global__ void __launch_bounds__(kMaxRowThreads) feature_rows_kernel(
    const int64_t* __restrict__ rowptr,        // [F + 1]
    const int64_t* __restrict__ item_ptr,      // [F + 1]
    const int64_t* __restrict__ part_ptr,      // [F + 1]
    const int64_t* __restrict__ item_feature,  // [grid.x]
    const int64_t* __restrict__ pairs,         // [nnz]
    const int* __restrict__ rows,              // [nnz]
    const scalar_t* __restrict__ coef,         // [B, k], or nullptr when dW is
    const scalar_t* __restrict__ y,            // [B, d]
    const scalar_t* __restrict__ W,            // [F, d] (kDot) or nullptr
    scalar_t* __restrict__ dv,                 // [B, k] (kDot) or nullptr
    scalar_t* __restrict__ dW,                 // [F, d], or nullptr (kDot: dv only)
    scalar_t* __restrict__ dsum,               // [F] or nullptr (not kDot)
    at::opmath_type<scalar_t>* __restrict__ part,      // [*, d] or nullptr when dW is
    at::opmath_type<scalar_t>* __restrict__ part_sum,  // [*] or nullptr when dsum is
    int64_t F, int64_t d,
    int64_t passes) {  // kDot: the slices covering d (else gridDim.y)
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, VW>;
  constexpr int kCols = kRowCols<scalar_t, kDot>;
  static_assert(kCols % VW == 0, "a thread's columns are whole vectors");
  constexpr int M = kCols / VW;
  constexpr int U = kPairsInFlight<kDot>;
  __shared__ int64_t s_off[kPairsPerItem];  // rows[q] * d
  __shared__ acc_t s_coef[kPairsPerItem];
  __shared__ acc_t s_dot[kDot ? kMaxRowWarps : 1][kPairsPerItem];
  CsrItem it;
  if (!csr_item(rowptr, item_ptr, part_ptr, item_feature, F, blockIdx.x, it)) return;
  const int n = static_cast<int>(it.q1 - it.q0);
  const bool grad_w = dW != nullptr;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    s_off[t] = static_cast<int64_t>(rows[it.q0 + t]) * d;
    s_coef[t] = grad_w ? static_cast<acc_t>(coef[pairs[it.q0 + t]]) : acc_t(0);
  }
  __syncthreads();
  const int64_t T = blockDim.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t s_begin = kDot ? 0 : blockIdx.y, s_end = kDot ? passes : s_begin + 1;
  for (int64_t s = s_begin; s < s_end; ++s) {
    // this thread's vector m starts at column col0 + m * stride of the row
    const int64_t stride = T * VW;
    const int64_t col0 = (s * M * T + threadIdx.x) * VW;
    bool ok[M];  // inside the row
#pragma unroll
    for (int m = 0; m < M; ++m) ok[m] = col0 + m * stride < d;
    acc_t w[kDot ? M : 1][VW];  // kDot: this thread's columns of the weight row
    if constexpr (kDot) {
      const scalar_t* wr = W + it.feature * d + col0;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const vec_t x = ok[m] ? load_vec<VW>(wr + m * stride) : vec_t{};
#pragma unroll
        for (int e = 0; e < VW; ++e) w[m][e] = static_cast<acc_t>(x.v[e]);
      }
    }
    acc_t acc[M][VW];
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int e = 0; e < VW; ++e) acc[m][e] = 0;
    }
    // pairs [t, t + P): every load first, then the multiply-adds pair by pair
    // (columns past the row read as zeros: no branch in the arithmetic)
    auto step = [&](auto width, int t) {
      constexpr int P = decltype(width)::value;
      vec_t g[P][M];
#pragma unroll
      for (int u = 0; u < P; ++u) {
        const scalar_t* yr = y + (s_off[t + u] + col0);
#pragma unroll
        for (int m = 0; m < M; ++m) g[u][m] = ok[m] ? load_vec<VW>(yr + m * stride) : vec_t{};
      }
      acc_t dot[P];
#pragma unroll
      for (int u = 0; u < P; ++u) {
        const acc_t c = s_coef[t + u];
        dot[u] = 0;
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            const acc_t gv = static_cast<acc_t>(g[u][m].v[e]);
            if constexpr (kDot) dot[u] += gv * w[m][e];
            if (grad_w) acc[m][e] += c * gv;
          }
        }
      }
      if constexpr (kDot) {
#pragma unroll
        for (int u = 0; u < P; ++u) {
          const acc_t p = warp_sum(dot[u]);
          if (lane == 0) s_dot[warp][t + u] = s == 0 ? p : s_dot[warp][t + u] + p;
        }
      }
    };
    int t = 0;
    for (; t + U <= n; t += U) step(std::integral_constant<int, U>{}, t);
    for (; t < n; ++t) step(std::integral_constant<int, 1>{}, t);
    if (grad_w) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (!ok[m]) continue;
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const int64_t c = col0 + m * stride + e;
          if (it.partial < 0) {
            dW[it.feature * d + c] = static_cast<scalar_t>(acc[m][e]);
          } else {
            part[it.partial * d + c] = acc[m][e];
          }
        }
      }
    }
  }
  if constexpr (kDot) {
    __syncthreads();
    const int warps = blockDim.x / kWarp;
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      acc_t total = s_dot[0][t];
      for (int v = 1; v < warps; ++v) total += s_dot[v][t];
      dv[pairs[it.q0 + t]] = static_cast<scalar_t>(total);
    }
  } else if (dsum && blockIdx.y == 0 && threadIdx.x == 0) {
    acc_t total = 0;
    for (int t = 0; t < n; ++t) total += s_coef[t];
    if (it.partial < 0) {
      dsum[it.feature] = static_cast<scalar_t>(total);
    } else {
      part_sum[it.partial] = total;
    }
  }
}

// Stage two: block (m, column slice) sums, in item order, the partial rows of
// the m-th feature with several items (and its partial sums when dsum is set).
template <typename scalar_t>
__global__ void reduce_partials_kernel(const int64_t* __restrict__ part_ptr,       // [F + 1]
                                       const int64_t* __restrict__ multi_feature,  // [grid.x]
                                       const at::opmath_type<scalar_t>* __restrict__ part,      // [*, d]
                                       const at::opmath_type<scalar_t>* __restrict__ part_sum,  // [*] or nullptr
                                       scalar_t* __restrict__ dW,                  // [F, d]
                                       scalar_t* __restrict__ dsum,                // [F] or nullptr
                                       int64_t F, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = multi_feature[blockIdx.x];
  if (i >= F) return;
  const int64_t r0 = part_ptr[i], r1 = part_ptr[i + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c < d) {
    acc_t acc = 0;
    for (int64_t r = r0; r < r1; ++r) acc += part[r * d + c];
    dW[i * d + c] = static_cast<scalar_t>(acc);
  }
  if (dsum && blockIdx.y == 0 && threadIdx.x == 0) {
    acc_t total = 0;
    for (int64_t r = r0; r < r1; ++r) total += part_sum[r];
    dsum[i] = static_cast<scalar_t>(total);
  }
}

// The acc_t partial rows of a FeatureCsr's multi-item features ([rows, d]) and
// their partial sums ([rows], allocated only when wanted).
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> csr_partials(const FeatureCsr& csr, const at::Tensor& like, int64_t d,
                                               bool with_sums) {
  const auto opt = like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t r = csr.partial_rows_bound();
  return {at::empty({r, d}, opt), with_sums ? at::empty({r}, opt) : at::Tensor()};
}

template <typename scalar_t>
void reduce_partials(const FeatureCsr& csr, const at::Tensor& part, const at::Tensor& part_sum, scalar_t* dW,
                     scalar_t* dsum, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (csr.nnz <= kPairsPerItem) return;  // no feature has several items
  const int threads = threads_for(d);
  const dim3 grid(checked_grid(csr.multi_bound(), "reduce_partials"),
                  checked_grid_y(std::max<int64_t>(1, ceil_div(d, threads)), "reduce_partials"));
  DUALENC_LAUNCH(reduce_partials_kernel<scalar_t>, grid, threads, 0, stream)(
      csr.part_ptr.const_data_ptr<int64_t>(), csr.multi_feature.const_data_ptr<int64_t>(),
      static_cast<const acc_t*>(part.const_data_ptr()),
      dsum ? static_cast<const acc_t*>(part_sum.const_data_ptr()) : nullptr, dW, dsum, csr.F, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The block size and slices of a feature-major launch over rows of d columns
// read VW at a time, `cols` columns per thread and pass: the fewest slices of
// at most kMaxRowThreads threads that cover the row, the threads (a multiple of
// the warp size) balanced so the last slice is nearly full (d = 3200 in
// float32, 8 columns per thread: 2 slices of 224 threads, not 256 + 144).
struct RowPlan {
  int threads;
  int64_t slices;
};

inline RowPlan plan_rows(int64_t d, int vw, int cols) {
  const int64_t need = std::max<int64_t>(1, ceil_div(d / vw, cols / vw));  // threads for one pass over d
  const int64_t slices = ceil_div(need, kMaxRowThreads);
  return {static_cast<int>(ceil_div(ceil_div(need, slices), kWarp) * kWarp), slices};
}

// Whether the rows of width d at p can be read vw elements at a time (every
// row start aligned to vw elements).
template <typename scalar_t>
bool vector_rows(const scalar_t* p, int64_t d, int vw) {
  return d % vw == 0 && reinterpret_cast<std::uintptr_t>(p) % (sizeof(scalar_t) * static_cast<size_t>(vw)) == 0;
}

// Launches feature_rows_kernel with 16-byte loads when y's (and W's) rows
// allow them, plain loads otherwise.
template <typename scalar_t, bool kDot>
void launch_feature_rows(const FeatureCsr& csr, const scalar_t* coef, const scalar_t* y, const scalar_t* W,
                         scalar_t* dv, scalar_t* dW, scalar_t* dsum, at::opmath_type<scalar_t>* part,
                         at::opmath_type<scalar_t>* part_sum, int64_t d, const char* name) {
  constexpr int kVec = kVecWidth<scalar_t>;
  const bool vec = vector_rows(y, d, kVec) && (W == nullptr || vector_rows(W, d, kVec));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto width) {
    constexpr int VW = decltype(width)::value;
    const RowPlan plan = plan_rows(d, VW, kRowCols<scalar_t, kDot>);
    const dim3 grid(checked_grid(csr.item_bound(), name), kDot ? 1u : checked_grid_y(plan.slices, name));
    DUALENC_LAUNCH((feature_rows_kernel<scalar_t, VW, kDot>), grid, plan.threads, 0, stream)(
        csr.rowptr.const_data_ptr<int64_t>(), csr.item_ptr.const_data_ptr<int64_t>(),
        csr.part_ptr.const_data_ptr<int64_t>(), csr.item_feature.const_data_ptr<int64_t>(),
        csr.pairs.const_data_ptr<int64_t>(), csr.rows.const_data_ptr<int>(), coef, y, W, dv, dW, dsum, part,
        part_sum, csr.F, d, plan.slices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// dW[i] = sum over the pairs of feature i of coef * y[b] (and dsum[i] = sum of
// coef when dsum is set): feature_rows_kernel per (item, slice), then
// reduce_partials for features with several items.
template <typename scalar_t>
void scatter_rows(const FeatureCsr& csr, const scalar_t* coef, const scalar_t* y, scalar_t* dW,
                  scalar_t* dsum, int64_t F, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  (void)k;  // the batch rows come from the CSR
  if (F == 0) return;
  const std::pair<at::Tensor, at::Tensor> parts = csr_partials<acc_t>(csr, csr.rowptr, d, dsum != nullptr);
  const at::Tensor &part = parts.first, &part_sum = parts.second;
  launch_feature_rows<scalar_t, false>(csr, coef, y, nullptr, nullptr, dW, dsum,
                                       static_cast<acc_t*>(part.data_ptr()),
                                       dsum ? static_cast<acc_t*>(part_sum.data_ptr()) : nullptr, d,
                                       "scatter_rows");
  reduce_partials<scalar_t>(csr, part, part_sum, dW, dsum, d);
}

// Feature-major backward of a gather-sum out[b] = sum_j coef[b, j] W[idx[b, j]]
// with upstream gradient g, both products in one pass over the code's CSR:
//   dv[p] = <g[p / k], W[i]>   and   dW[i] = sum over the pairs p of i of coef[p] * g[p / k].
// Each block reads its feature's W row once and each pair's g row once, for
// both. dW == nullptr: dv only (coef unused). Writes every dW row (zeros for
// features no pair selected); deterministic (each dv entry has one writer and
// a fixed summation order; dW as scatter_rows).
template <typename scalar_t>
void dot_scatter_rows(const FeatureCsr& csr,
                      const scalar_t* g,     // [B, d]
                      const scalar_t* coef,  // [B, k], or nullptr when dW is
                      const scalar_t* W,     // [F, d]
                      scalar_t* dv,          // [B, k]
                      scalar_t* dW,          // [F, d] or nullptr
                      int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  if (csr.F == 0) return;
  const at::Tensor part = dW ? csr_partials<acc_t>(csr, csr.rowptr, d, false).first : at::Tensor();
  launch_feature_rows<scalar_t, true>(csr, dW ? coef : nullptr, g, W, dv, dW, nullptr,
                                      dW ? static_cast<acc_t*>(part.data_ptr()) : nullptr, nullptr, d,
                                      "dot_scatter_rows");
  if (dW) reduce_partials<scalar_t>(csr, part, at::Tensor(), dW, nullptr, d);
}

// Defined in staged_rows.cuh (included at the end of this file).
template <typename scalar_t>
void staged_scatter_rows(const FeatureCsr& csr, const scalar_t* coef, const scalar_t* y, scalar_t* dW,
                         scalar_t* dsum, int64_t F, int64_t k, int64_t d, int64_t smem_budget);

// The primitive set the shared host code (ops/sparse_impl.h) runs on.
// out[p] = block[rows[q], f - f0] for every pair q of the features f in
// [f0, f0 + n): the selected entries of a [B, n] slice of a dense product read
// through the code's transpose. One warp per feature, its lanes over the
// feature's pairs (no host read of the pair counts).
template <typename scalar_t>
__global__ void gather_transposed_kernel(const int64_t* __restrict__ rowptr,  // [F + 1]
                                         const int64_t* __restrict__ pairs,   // [nnz] pair ids b * k + j
                                         const int* __restrict__ rows,        // [nnz] batch rows
                                         const scalar_t* __restrict__ block,  // [B, n]
                                         int64_t f0, int64_t n,
                                         scalar_t* __restrict__ out) {        // [B * k]
  const int64_t warps = blockDim.x / kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp;  // column of block
  if (c >= n) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t q1 = rowptr[f0 + c + 1];
  for (int64_t q = rowptr[f0 + c] + lane; q < q1; q += kWarp) out[pairs[q]] = block[int64_t(rows[q]) * n + c];
}

template <typename scalar_t>
void gather_transposed(const FeatureCsr& csr, const scalar_t* block, int64_t f0, int64_t n, scalar_t* out) {
  if (n <= 0) return;
  constexpr int threads = 256;
  const int64_t blocks = ceil_div(n, threads / kWarp);
  auto stream = c10::cuda::getCurrentCUDAStream();
  DUALENC_LAUNCH(gather_transposed_kernel<scalar_t>, checked_grid(blocks, "gather_transposed_kernel"), threads, 0,
                 stream)(csr.rowptr.const_data_ptr<int64_t>(), csr.pairs.const_data_ptr<int64_t>(),
                         csr.rows.const_data_ptr<int>(), block, f0, n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Prims {
  using Csr = FeatureCsr;
  template <typename T>
  static void gather_sum(const T* coef, const int64_t* idx, const T* W, const T* bias, T* out, int64_t B,
                         int64_t k, int64_t d) {
    cuda::gather_sum<T>(coef, idx, W, bias, out, B, k, d);
  }
  template <typename T>
  static void row_dot(const T* g, const int64_t* idx, const T* W, T* out, int64_t B, int64_t k, int64_t d) {
    cuda::row_dot<T>(g, idx, W, out, B, k, d);
  }
  template <typename T>
  static void scatter_rows(const Csr& csr, const T* coef, const T* y, T* dW, T* dsum, int64_t F, int64_t k,
                           int64_t d) {
    cuda::scatter_rows<T>(csr, coef, y, dW, dsum, F, k, d);
  }
  template <typename T>  // scatter_rows through shared-memory column slices (staged_rows.cuh)
  static void staged_scatter_rows(const Csr& csr, const T* coef, const T* y, T* dW, T* dsum, int64_t F,
                                  int64_t k, int64_t d, int64_t smem_budget) {
    cuda::staged_scatter_rows<T>(csr, coef, y, dW, dsum, F, k, d, smem_budget);
  }
  template <typename T>
  static void gather_transposed(const Csr& csr, const T* block, int64_t f0, int64_t n, T* out) {
    cuda::gather_transposed<T>(csr, block, f0, n, out);
  }
};

}  // namespace dualenc_fast::cuda

#include "ops/cuda/staged_rows.cuh"
