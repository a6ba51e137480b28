// CUDA versions of the three primitives (see csrc/ops/cpu/primitives.h):
//   gather_sum   out[b]  = bias + sum_j coef[b, j] * W[idx[b, j]]
//   row_dot      dv[b,j] = <g[b], W[idx[b, j]]>
//   FeatureCsr + scatter_rows: dW[i] = sum over pairs with idx == i of coef * y[b]
// Every launch goes on the current stream and is followed by
// C10_CUDA_KERNEL_LAUNCH_CHECK(); accumulation is in at::opmath_type<scalar_t>.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

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

// Transpose of a sparse code, built on the device: pairs sorted by feature with
// a stable sort (so reductions over a feature's pairs run in increasing pair
// id: deterministic), rowptr[i] = the first sorted position holding a feature
// >= i (a binary search; no host round-trip, unlike a bincount).
struct FeatureCsr {
  at::Tensor rowptr;  // [F + 1] int64
  at::Tensor pairs;   // [B * k] int64

  FeatureCsr(const at::Tensor& idx, int64_t F) {
    const auto flat = idx.reshape({-1});
    auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    pairs = std::get<1>(sorted);
    rowptr = at::searchsorted(std::get<0>(sorted), at::arange(F + 1, flat.options()));
  }
};

// One block per feature; threads stride over the d columns.
template <typename scalar_t>
__global__ void scatter_rows_kernel(const int64_t* __restrict__ rowptr,  // [F + 1]
                                    const int64_t* __restrict__ pairs,   // [B * k]
                                    const scalar_t* __restrict__ coef,   // [B, k]
                                    const scalar_t* __restrict__ y,      // [B, d]
                                    scalar_t* __restrict__ dW,           // [F, d]
                                    scalar_t* __restrict__ dsum,         // [F] or nullptr
                                    int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x;
  const int64_t q0 = rowptr[i], q1 = rowptr[i + 1];
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    acc_t acc = 0;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t p = pairs[q];
      acc += static_cast<acc_t>(coef[p]) * static_cast<acc_t>(y[(p / k) * d + c]);
    }
    dW[i * d + c] = static_cast<scalar_t>(acc);
  }
  if (dsum && threadIdx.x == 0) {
    acc_t total = 0;
    for (int64_t q = q0; q < q1; ++q) total += static_cast<acc_t>(coef[pairs[q]]);
    dsum[i] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t>
void scatter_rows(const FeatureCsr& csr, const scalar_t* coef, const scalar_t* y, scalar_t* dW,
                  scalar_t* dsum, int64_t F, int64_t k, int64_t d) {
  if (F == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  DUALENC_LAUNCH(scatter_rows_kernel<scalar_t>, checked_grid(F, "scatter_rows_kernel"), threads_for(d), 0, stream)(
      csr.rowptr.const_data_ptr<int64_t>(), csr.pairs.const_data_ptr<int64_t>(), coef, y, dW, dsum,
      k, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
