// CUDA kernels of fm_interaction: one block per row, threads over the K
// embedding columns (coalesced reads of each active embedding row). Backward:
// a row kernel (s into shared memory, one warp per active feature for dv) and
// a feature kernel reducing dE over the feature's pairs (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csr_share.h"
#include "ops/cuda/primitives.cuh"
#include "ops/fm_interaction.h"

namespace dualenc_fast::cuda {
namespace {

template <typename scalar_t>
__global__ void fm_forward_kernel(const scalar_t* __restrict__ v,    // [B, k]
                                  const int64_t* __restrict__ idx,   // [B, k]
                                  const scalar_t* __restrict__ E,    // [F, K]
                                  scalar_t* __restrict__ out,        // [B, K]
                                  int64_t k, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
    acc_t s = 0, q = 0;
    for (int64_t j = 0; j < k; ++j) {
      const acc_t t = static_cast<acc_t>(v[b * k + j]) * static_cast<acc_t>(E[idx[b * k + j] * K + c]);
      s += t;
      q += t * t;
    }
    out[b * K + c] = static_cast<scalar_t>(acc_t(0.5) * (s * s - q));
  }
}

// s for row b into S [B, K] (acc_t) and shared memory; then dv, one warp per j.
template <typename scalar_t>
__global__ void fm_backward_rows_kernel(const scalar_t* __restrict__ g,    // [B, K]
                                        const scalar_t* __restrict__ v,    // [B, k]
                                        const int64_t* __restrict__ idx,   // [B, k]
                                        const scalar_t* __restrict__ E,    // [F, K]
                                        at::opmath_type<scalar_t>* __restrict__ S,  // [B, K]
                                        scalar_t* __restrict__ dv,         // [B, k] or nullptr
                                        int64_t k, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* s = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t b = blockIdx.x;
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
    acc_t acc = 0;
    for (int64_t j = 0; j < k; ++j) {
      acc += static_cast<acc_t>(v[b * k + j]) * static_cast<acc_t>(E[idx[b * k + j] * K + c]);
    }
    s[c] = acc;
    S[b * K + c] = acc;
  }
  __syncthreads();
  if (dv == nullptr) return;
  const int lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  for (int64_t j = threadIdx.x / kWarp; j < k; j += warps) {
    const acc_t vj = static_cast<acc_t>(v[b * k + j]);
    const scalar_t* e = E + idx[b * k + j] * K;
    acc_t acc = 0;
    for (int64_t c = lane; c < K; c += kWarp) {
      const acc_t ec = static_cast<acc_t>(e[c]);
      acc += static_cast<acc_t>(g[b * K + c]) * ec * (s[c] - vj * ec);
    }
    acc = warp_sum(acc);
    if (lane == 0) dv[b * k + j] = static_cast<scalar_t>(acc);
  }
}

// dE[i] = sum over the pairs of feature i of v * g[b] * (S[b] - v * E[i]):
// block (work item of the CSR, column slice), as scatter_rows; a
// feature with several items writes acc_t partial rows that
// reduce_partials sums in item order (deterministic).
template <typename scalar_t>
__global__ void fm_backward_features_kernel(const int64_t* __restrict__ rowptr,    // [F + 1]
                                            const int64_t* __restrict__ item_ptr,  // [F + 1]
                                            const int64_t* __restrict__ part_ptr,  // [F + 1]
                                            const int64_t* __restrict__ item_feature,  // [grid.x]
                                            const int64_t* __restrict__ pairs,     // [nnz]
                                            const int* __restrict__ rows,          // [nnz]
                                            const scalar_t* __restrict__ g,        // [B, K]
                                            const scalar_t* __restrict__ v,        // [B, k]
                                            const scalar_t* __restrict__ E,        // [F, K]
                                            const at::opmath_type<scalar_t>* __restrict__ S,  // [B, K]
                                            scalar_t* __restrict__ dE,             // [F, K]
                                            at::opmath_type<scalar_t>* __restrict__ part,     // [*, K]
                                            int64_t F, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int s_row[kPairsPerItem];
  __shared__ acc_t s_v[kPairsPerItem];
  CsrItem it;
  if (!csr_item(rowptr, item_ptr, part_ptr, item_feature, F, blockIdx.x, it)) return;
  const int n = static_cast<int>(it.q1 - it.q0);
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    s_row[t] = rows[it.q0 + t];
    s_v[t] = static_cast<acc_t>(v[pairs[it.q0 + t]]);
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= K) return;
  const acc_t ec = static_cast<acc_t>(E[it.feature * K + c]);
  acc_t acc = 0;
  for (int t = 0; t < n; ++t) {
    const int64_t bc = static_cast<int64_t>(s_row[t]) * K + c;
    const acc_t vj = s_v[t];
    acc += vj * static_cast<acc_t>(g[bc]) * (S[bc] - vj * ec);
  }
  if (it.partial < 0) {
    dE[it.feature * K + c] = static_cast<scalar_t>(acc);
  } else {
    part[it.partial * K + c] = acc;
  }
}

at::Tensor fm_interaction_cuda(const at::Tensor& values,      // [B, k]
                               const at::Tensor& indices,     // [B, k] int64
                               const at::Tensor& embeddings,  // [F, K]
                               bool check_indices) {
  const c10::cuda::CUDAGuard guard(values.device());
  auto a = prepare_fm_interaction(values, indices, embeddings, check_indices);
  const at::Tensor &v = a.v, &idx = a.idx, &E = a.E;
  at::Tensor& out = a.out;
  const int64_t B = a.B, k = a.k, K = a.K;
  if (B == 0 || K == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fm_interaction_cuda", [&] {
    DUALENC_LAUNCH(fm_forward_kernel<scalar_t>, checked_grid(B, "fm_interaction"), threads_cover(K), 0, stream)(
        v.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), E.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), k, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fm_interaction_backward_cuda(
    const at::Tensor& grad_p,      // [B, K]
    const at::Tensor& values,      // [B, k]
    const at::Tensor& indices,     // [B, k] int64
    const at::Tensor& embeddings,  // [F, K]
    bool need_values_grad, bool need_embeddings_grad, bool check_indices) {
  const c10::cuda::CUDAGuard guard(values.device());
  auto a = prepare_fm_interaction_backward(grad_p, values, indices, embeddings, need_values_grad,
                                           need_embeddings_grad, check_indices);
  const at::Tensor &g = a.g, &v = a.v, &idx = a.idx, &E = a.E;
  at::Tensor &grad_v = a.grad_v, &grad_E = a.grad_E;
  const int64_t B = a.B, k = a.k, F = a.F, K = a.K;
  if (!need_values_grad && !need_embeddings_grad) return {grad_v, grad_E};
  if (need_embeddings_grad && B == 0) grad_E.zero_();
  if (B == 0) return {grad_v, grad_E};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fm_interaction_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto S = at::empty({B, K}, v.options().dtype(acc_dtype));
    const size_t smem = static_cast<size_t>(K) * sizeof(acc_t);
    TORCH_CHECK_VALUE(smem <= 48 * 1024, "dualenc_fast: fm_interaction on CUDA supports embedding ",
                      "widths up to ", 48 * 1024 / sizeof(acc_t), ", got embeddings of shape ", E.sizes());
    DUALENC_LAUNCH(fm_backward_rows_kernel<scalar_t>, checked_grid(B, "fm_interaction_backward"),
                   std::max(256, threads_cover(K)), smem, stream)(
        g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        E.const_data_ptr<scalar_t>(), S.mutable_data_ptr<acc_t>(),
        need_values_grad ? grad_v.mutable_data_ptr<scalar_t>() : nullptr, k, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_embeddings_grad && F > 0) {
      const auto csr_p = shared_csr<FeatureCsr>(indices, F, [&] { return FeatureCsr(idx, F); });
      const auto& csr = *csr_p;
      auto parts = csr_partials<acc_t>(csr, v, K, false);
      const int threads = threads_cover(K);
      const dim3 grid(checked_grid(csr.item_bound(), "fm_interaction_backward"),
                      checked_grid_y(std::max<int64_t>(1, ceil_div(K, threads)), "fm_interaction_backward"));
      DUALENC_LAUNCH(fm_backward_features_kernel<scalar_t>, grid, threads, 0, stream)(
          csr.rowptr.const_data_ptr<int64_t>(), csr.item_ptr.const_data_ptr<int64_t>(),
          csr.part_ptr.const_data_ptr<int64_t>(), csr.item_feature.const_data_ptr<int64_t>(),
          csr.pairs.const_data_ptr<int64_t>(), csr.rows.const_data_ptr<int>(), g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          E.const_data_ptr<scalar_t>(), S.const_data_ptr<acc_t>(), grad_E.mutable_data_ptr<scalar_t>(),
          parts.first.mutable_data_ptr<acc_t>(), F, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_partials<scalar_t>(csr, parts.first, parts.second, grad_E.mutable_data_ptr<scalar_t>(), nullptr, K);
    }
  });
  return {grad_v, grad_E};
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("fm_interaction", &dualenc_fast::cuda::fm_interaction_cuda);
  m.impl("fm_interaction_backward", &dualenc_fast::cuda::fm_interaction_backward_cuda);
}
