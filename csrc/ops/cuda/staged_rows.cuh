// staged_scatter_rows: scatter_rows' contract (dW[i] = sum over the pairs of
// feature i of coef * y[b]; dsum[i] = sum of coef when dsum is set) computed
// with column slices of y staged in shared memory for all B rows, so that each
// pair's slice of its y row comes from shared memory instead of L2. It is the
// alternative to the dense form's weight-gradient GEMMs (code^T @ y) that
// ops.set_dense_weight_grads("staged") selects (ops/sparse_impl.h).
//
// Included at the end of primitives.cuh (it uses FeatureCsr, csr_item, Vec,
// csr_partials, reduce_partials and scatter_rows from there).
//
// Design. Block (tile, slice) covers kStagedTileItems consecutive work items
// of the FeatureCsr and one slice of S = groups * VW columns (VW = one 16-byte
// vector: 8 bf16/fp16, 4 fp32, 2 fp64; groups = 1..kStagedMaxGroups):
//   1. it copies y[:, c0 : c0 + S] (every batch row, zeros past d) into shared
//      memory as [B, S] scalar_t (plain element loads: any d, any alignment);
//   2. each thread takes (item, group) tasks of the tile in turn and sums, in
//      the item's pair order, coef[q] * s_y[rows[q], group's VW columns] in
//      acc_t registers (one 16-byte shared-memory load per pair), then writes
//      the feature's row (one-item features) or the item's acc_t partial row;
//      reduce_partials sums a multi-item feature's partial rows in item order.
// Each output element is therefore summed pair by pair in the CSR's order,
// then over the items in order: the value depends only on the code, never on
// the tile, the slice width or the schedule (bitwise run to run), and equals
// scatter_rows' (feature_rows_kernel) summation order. Hot features are cut
// into items of at most kPairsPerItem pairs as in scatter_rows, so they spread
// over several threads instead of serialising one.
//
// Batch size rule. A slice needs B * groups * 16 bytes of shared memory; the
// budget is the device's opt-in maximum per block (227 KB on sm_90), or
// SparseStrategy::staged_smem_bytes when set. groups is the largest of
// 1..kStagedMaxGroups that fits; when not even one 16-byte group of all B
// rows fits (B > 14,528 rows on sm_90), staged_scatter_rows falls back to
// scatter_rows (feature_rows_kernel), which has no limit on B.
//
// Cost at the paper's shape P in bf16 (B = 4096, d = 3200, F = 50000,
// k = 1024: nnz = 4.19 M pairs; arithmetic only, not measured): groups = 3
// (S = 24, 192 KB of shared memory, one block per SM), 134 slices,
// ceil((F + nnz / 256) / 4096) = 17 tiles. L2 -> shared memory: 17 x B x d x
// 2 B = 0.45 GB; pair metadata (rows int32 + coefficient, 6 B per pair and
// slice): 3.4 GB through L1/L2; shared-memory reads nnz x d x 2 B = 26.8 GB:
// 0.9 ms at 128 B per cycle and SM (29.6 TB/s) without bank conflicts, but
// the 8 lanes of a quarter warp read 16 bytes each of random rows, so their
// accesses collide in a bank quad about twice on average: ~1.8 ms. Issue
// (nvcc 13.0, sm_90 SASS, bf16: 48 registers, no spills; 512 threads, one
// block per SM at 192 KB): the pair loop, unrolled by 4, is 106 instructions,
// ~26.5 per (pair, 8 columns) (2 global loads, a 16-byte shared load, 8 FMAs,
// 8 bf16 widenings (see widen), the address and the coefficient sum),
// x nnz x d / 8 / 32 = 1.39 G warp-instructions at ~927 G/s: ~1.5 ms.
// Estimate: ~1.5-1.8 ms per product (issue or shared-memory conflicts), a
// little under the 1.64-2.0 ms of the bf16 GEMM it replaces, not the ~1 ms
// hoped for: a measurement decides.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ops/cuda/launch.cuh"
#include "ops/grid.h"

namespace dualenc_fast::cuda {

constexpr int kStagedThreads = 512;
constexpr int64_t kStagedTileItems = 4096;  // work items per block
constexpr int kStagedMaxGroups = 3;         // 16-byte column groups per slice

// coef_q[q] = coef[pairs[q]]: each sorted pair's coefficient, so the staged
// kernel reads it with its row, in order (no indirection per slice).
template <typename scalar_t>
__global__ void gather_pair_coef_kernel(const int64_t* __restrict__ pairs,  // [nnz]
                                        const scalar_t* __restrict__ coef,  // [B, k]
                                        scalar_t* __restrict__ coef_q,      // [nnz]
                                        int64_t nnz) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q < nnz) coef_q[q] = coef[pairs[q]];
}

// The launch's dynamic shared memory (16-byte aligned). In a header, so the
// emulated build (which rewrites `extern __shared__` only in .cu files) asks
// the emulator for it directly.
__device__ __forceinline__ unsigned char* staged_dynamic_smem() {
#if defined(DUALENC_EMU)
  return static_cast<unsigned char*>(::emu::detail::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return smem_raw;
#endif
}

// The VW elements of x widened to acc_t. bfloat16 is the upper half of a
// float32, so each 32-bit word of two elements widens with one shift and one
// AND (the same values as static_cast, fewer instructions than extracting
// each half first).
template <typename scalar_t, int VW>
__device__ __forceinline__ void widen(const Vec<scalar_t, VW>& x, at::opmath_type<scalar_t> (&out)[VW]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    static_assert(VW % 2 == 0, "whole 32-bit words");
    Vec<unsigned, VW / 2> w;
    memcpy(&w, &x, sizeof(w));  // the same 16 bytes as 32-bit words (registers, no copy)
#pragma unroll
    for (int i = 0; i < VW / 2; ++i) {
      out[2 * i] = __uint_as_float(w.v[i] << 16);
      out[2 * i + 1] = __uint_as_float(w.v[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int e = 0; e < VW; ++e) out[e] = static_cast<at::opmath_type<scalar_t>>(x.v[e]);
  }
}

// Block (tile blockIdx.x, slice blockIdx.y); see the file comment.
template <typename scalar_t>
__global__ void __launch_bounds__(kStagedThreads) staged_rows_kernel(
    const int64_t* __restrict__ rowptr,        // [F + 1]
    const int64_t* __restrict__ item_ptr,      // [F + 1]
    const int64_t* __restrict__ part_ptr,      // [F + 1]
    const int64_t* __restrict__ item_feature,  // [item_bound]
    const int* __restrict__ rows,              // [nnz] batch row of each sorted pair
    const scalar_t* __restrict__ coef_q,       // [nnz] coefficient of each sorted pair
    const scalar_t* __restrict__ y,            // [B, d]
    scalar_t* __restrict__ dW,                 // [F, d]
    scalar_t* __restrict__ dsum,               // [F] or nullptr
    at::opmath_type<scalar_t>* __restrict__ part,      // [*, d]
    at::opmath_type<scalar_t>* __restrict__ part_sum,  // [*] or nullptr when dsum is
    int64_t F, int64_t n_items,                // n_items: item_bound (items past the last are skipped)
    int64_t B, int64_t d,
    int groups) {                              // 16-byte column groups per slice
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VW = kVecWidth<scalar_t>;
  scalar_t* s_y = reinterpret_cast<scalar_t*>(staged_dynamic_smem());  // [B, S]
  const int S = groups * VW;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * S;

  // 1. stage y[:, c0 : c0 + S] (zeros past column d)
  // (thread t copies column t % S of rows t / S, t / S + per_pass, ...; the
  // last blockDim.x % S threads idle here)
  const int per_pass = static_cast<int>(blockDim.x) / S;
  if (static_cast<int>(threadIdx.x) < per_pass * S) {
    const int sc = static_cast<int>(threadIdx.x) % S;
    const int64_t c = c0 + sc;
    for (int64_t r = threadIdx.x / S; r < B; r += per_pass) {
      s_y[r * S + sc] = c < d ? y[r * d + c] : static_cast<scalar_t>(0.0f);
    }
  }
  __syncthreads();

  // 2. (item, group) tasks of the tile, each summed over its pairs in order
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kStagedTileItems;
  const int64_t last = first + kStagedTileItems < n_items ? first + kStagedTileItems : n_items;
  const bool with_sum = dsum != nullptr && blockIdx.y == 0;
  for (int64_t task = first * groups + threadIdx.x; task < last * groups; task += blockDim.x) {
    const int64_t item = task / groups;
    const int g = static_cast<int>(task % groups);
    const int64_t col = c0 + static_cast<int64_t>(g) * VW;  // this task's first column
    if (col >= d) continue;  // a group wholly past the row (the last slice)
    CsrItem it;
    if (!csr_item(rowptr, item_ptr, part_ptr, item_feature, F, item, it)) continue;
    acc_t acc[VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) acc[e] = 0;
    acc_t total = 0;  // the coefficients' sum (dsum; group 0 of slice 0)
    const scalar_t* sy = s_y + g * VW;
#pragma unroll 4
    for (int64_t q = it.q0; q < it.q1; ++q) {
      const acc_t c = static_cast<acc_t>(coef_q[q]);
      acc_t x[VW];
      widen<scalar_t, VW>(load_vec<VW>(sy + static_cast<int64_t>(rows[q]) * S), x);
#pragma unroll
      for (int e = 0; e < VW; ++e) acc[e] += c * x[e];
      total += c;
    }
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      const int64_t c = col + e;
      if (c >= d) break;
      if (it.partial < 0) {
        dW[it.feature * d + c] = static_cast<scalar_t>(acc[e]);
      } else {
        part[it.partial * d + c] = acc[e];
      }
    }
    if (with_sum && g == 0) {
      if (it.partial < 0) {
        dsum[it.feature] = static_cast<scalar_t>(total);
      } else {
        part_sum[it.partial] = total;
      }
    }
  }
}

// Shared-memory bytes a staged block may use: `budget` when > 0, else the
// device's opt-in maximum per block.
inline int64_t staged_smem_limit(int64_t budget) {
  if (budget > 0) return budget;
#if defined(DUALENC_EMU)
  return int64_t{227} * 1024;  // sm_90's opt-in maximum (the emulator has no device to ask)
#else
  int dev = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
#endif
}

// 16-byte column groups per slice for B rows within `smem_bytes`; 0: not even
// one group fits (the caller falls back to scatter_rows).
inline int staged_groups(int64_t B, int64_t smem_bytes) {
  const int64_t per_group = std::max<int64_t>(1, B) * 16;
  return static_cast<int>(std::min<int64_t>(kStagedMaxGroups, smem_bytes / per_group));
}

// scatter_rows' contract (see scatter_rows in primitives.cuh) through
// staged_rows_kernel; smem_budget: SparseStrategy::staged_smem_bytes (0: the
// device's limit). Falls back to scatter_rows when a 16-byte group of all B
// rows does not fit (B = csr.nnz / k).
template <typename scalar_t>
void staged_scatter_rows(const FeatureCsr& csr, const scalar_t* coef, const scalar_t* y, scalar_t* dW,
                         scalar_t* dsum, int64_t F, int64_t k, int64_t d, int64_t smem_budget) {
  using acc_t = at::opmath_type<scalar_t>;
  if (F == 0) return;
  const int64_t B = k > 0 ? csr.nnz / k : 0;
  const int groups = staged_groups(B, staged_smem_limit(smem_budget));
  if (csr.nnz == 0 || d == 0 || groups == 0) {
    scatter_rows<scalar_t>(csr, coef, y, dW, dsum, F, k, d);
    return;
  }
  constexpr int VW = kVecWidth<scalar_t>;
  const int64_t S = static_cast<int64_t>(groups) * VW;
  const size_t smem = static_cast<size_t>(B * S) * sizeof(scalar_t);
  auto stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor coef_q = at::empty({csr.nnz}, csr.rowptr.options().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  constexpr int kGatherThreads = 256;
  DUALENC_LAUNCH(gather_pair_coef_kernel<scalar_t>,
                 checked_grid(ceil_div(csr.nnz, kGatherThreads), "gather_pair_coef_kernel"), kGatherThreads, 0,
                 stream)(csr.pairs.const_data_ptr<int64_t>(), coef, static_cast<scalar_t*>(coef_q.data_ptr()),
                         csr.nnz);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const std::pair<at::Tensor, at::Tensor> parts = csr_partials<acc_t>(csr, csr.rowptr, d, dsum != nullptr);
  const at::Tensor &part = parts.first, &part_sum = parts.second;
#if !defined(DUALENC_EMU)
  C10_CUDA_CHECK(cudaFuncSetAttribute(staged_rows_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
#endif
  const dim3 grid(checked_grid(ceil_div(csr.item_bound(), kStagedTileItems), "staged_rows_kernel"),
                  checked_grid_y(ceil_div(d, S), "staged_rows_kernel"));
  DUALENC_LAUNCH(staged_rows_kernel<scalar_t>, grid, kStagedThreads, smem, stream)(
      csr.rowptr.const_data_ptr<int64_t>(), csr.item_ptr.const_data_ptr<int64_t>(),
      csr.part_ptr.const_data_ptr<int64_t>(), csr.item_feature.const_data_ptr<int64_t>(),
      csr.rows.const_data_ptr<int>(), static_cast<const scalar_t*>(coef_q.const_data_ptr()), y, dW, dsum,
      static_cast<acc_t*>(part.data_ptr()), dsum ? static_cast<acc_t*>(part_sum.data_ptr()) : nullptr, csr.F,
      csr.item_bound(), B, d, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_partials<scalar_t>(csr, part, part_sum, dW, dsum, d);
}

}  // namespace dualenc_fast::cuda
