// CUDA versions of the three primitives (see csrc/ops/cpu/primitives.h):
//   gather_sum   out[b]  = bias + sum_j coef[b, j] * W[idx[b, j]]
//   row_dot      dv[b,j] = <g[b], W[idx[b, j]]>
//   FeatureCsr + scatter_rows: dW[i] = sum over pairs with idx == i of coef * y[b]
//     (fixed-size work items and a deterministic two-stage sum; see FeatureCsr)
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
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
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

// Stage one of scatter_rows: block (item, column slice). The item's batch rows
// and coefficients are staged in shared memory, then each thread sums its
// column over the item's pairs in order.
template <typename scalar_t>
__global__ void scatter_rows_kernel(const int64_t* __restrict__ rowptr,    // [F + 1]
                                    const int64_t* __restrict__ item_ptr,  // [F + 1]
                                    const int64_t* __restrict__ part_ptr,  // [F + 1]
                                    const int64_t* __restrict__ item_feature,  // [grid.x]
                                    const int64_t* __restrict__ pairs,     // [nnz]
                                    const int* __restrict__ rows,          // [nnz]
                                    const scalar_t* __restrict__ coef,     // [B, k]
                                    const scalar_t* __restrict__ y,        // [B, d]
                                    scalar_t* __restrict__ dW,             // [F, d]
                                    scalar_t* __restrict__ dsum,           // [F] or nullptr
                                    at::opmath_type<scalar_t>* __restrict__ part,      // [*, d]
                                    at::opmath_type<scalar_t>* __restrict__ part_sum,  // [*]
                                    int64_t F, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int s_row[kPairsPerItem];
  __shared__ acc_t s_coef[kPairsPerItem];
  CsrItem it;
  if (!csr_item(rowptr, item_ptr, part_ptr, item_feature, F, blockIdx.x, it)) return;
  const int n = static_cast<int>(it.q1 - it.q0);
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    s_row[t] = rows[it.q0 + t];
    s_coef[t] = static_cast<acc_t>(coef[pairs[it.q0 + t]]);
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c < d) {
    acc_t acc = 0;
    for (int t = 0; t < n; ++t) acc += s_coef[t] * static_cast<acc_t>(y[static_cast<int64_t>(s_row[t]) * d + c]);
    if (it.partial < 0) {
      dW[it.feature * d + c] = static_cast<scalar_t>(acc);
    } else {
      part[it.partial * d + c] = acc;
    }
  }
  if (dsum && blockIdx.y == 0 && threadIdx.x == 0) {
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
                  checked_grid(std::max<int64_t>(1, ceil_div(d, threads)), "reduce_partials"));
  DUALENC_LAUNCH(reduce_partials_kernel<scalar_t>, grid, threads, 0, stream)(
      csr.part_ptr.const_data_ptr<int64_t>(), csr.multi_feature.const_data_ptr<int64_t>(),
      static_cast<const acc_t*>(part.const_data_ptr()),
      dsum ? static_cast<const acc_t*>(part_sum.const_data_ptr()) : nullptr, dW, dsum, csr.F, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void scatter_rows(const FeatureCsr& csr, const scalar_t* coef, const scalar_t* y, scalar_t* dW,
                  scalar_t* dsum, int64_t F, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  (void)k;  // the batch rows come from the CSR
  if (F == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const std::pair<at::Tensor, at::Tensor> parts = csr_partials<acc_t>(csr, csr.rowptr, d, dsum != nullptr);
  const at::Tensor &part = parts.first, &part_sum = parts.second;
  const int threads = threads_for(d);
  const dim3 grid(checked_grid(csr.item_bound(), "scatter_rows"),
                  checked_grid(std::max<int64_t>(1, ceil_div(d, threads)), "scatter_rows"));
  DUALENC_LAUNCH(scatter_rows_kernel<scalar_t>, grid, threads, 0, stream)(
      csr.rowptr.const_data_ptr<int64_t>(), csr.item_ptr.const_data_ptr<int64_t>(),
      csr.part_ptr.const_data_ptr<int64_t>(), csr.item_feature.const_data_ptr<int64_t>(),
      csr.pairs.const_data_ptr<int64_t>(), csr.rows.const_data_ptr<int>(), coef, y, dW, dsum,
      static_cast<acc_t*>(part.data_ptr()), dsum ? static_cast<acc_t*>(part_sum.data_ptr()) : nullptr, F, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_partials<scalar_t>(csr, part, part_sum, dW, dsum, d);
}

// The primitive set the shared host code (ops/sparse_impl.h) runs on.
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
};

}  // namespace dualenc_fast::cuda
