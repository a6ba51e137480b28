// CUDA element-wise passes of the integration MLP (dropout mask, ReLU, and the
// fused ReLU backward); the GEMM chain is shared (ops/integration_mlp.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/cuda/primitives.cuh"
#include "ops/integration_mlp.h"

namespace dualenc_fast::cuda {
namespace {

constexpr int kThreads = 256;

// The grid of the grid-stride element-wise kernels: at most 65536 blocks,
// checked like every launch.
inline unsigned blocks_for(int64_t n) {
  return checked_grid(std::min<int64_t>(ceil_div(n, kThreads), int64_t(1) << 16),
                      "apply_dropout_kernel/relu_kernel/relu_backward_kernel");
}

template <typename scalar_t>
__global__ void apply_dropout_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                                     scalar_t* __restrict__ out, at::opmath_type<scalar_t> scale,
                                     int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    // a dropped entry is x * 0 as in torch (NaN and Inf give NaN); scale 0
    // (rate 1: everything dropped) gives exact zeros, as the reference
    const acc_t v = static_cast<acc_t>(x[i]);
    out[i] = static_cast<scalar_t>(mask[i] ? v * scale : (scale == acc_t(0) ? acc_t(0) : v * acc_t(0)));
  }
}

template <typename scalar_t>
__global__ void relu_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<acc_t>(x[i]) <= acc_t(0) ? scalar_t(0) : x[i];  // relu(NaN) = NaN, as torch
  }
}

template <typename scalar_t>
__global__ void relu_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ extra, scalar_t* __restrict__ dpre,
                                     scalar_t* __restrict__ h, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const bool on = !(static_cast<acc_t>(x[i]) <= acc_t(0));  // NaN passes its gradient, as torch
    acc_t v = on ? static_cast<acc_t>(g[i]) : acc_t(0);
    if (extra) v += static_cast<acc_t>(extra[i]);
    dpre[i] = static_cast<scalar_t>(v);
    h[i] = on ? x[i] : scalar_t(0);
  }
}

at::Tensor apply_dropout_cuda(const at::Tensor& p, const at::Tensor& mask, double scale) {
  const auto x = p.contiguous();
  const auto m = mask.contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_dropout_cuda", [&] {
    DUALENC_LAUNCH(apply_dropout_kernel<scalar_t>, blocks_for(n), kThreads, 0, stream)(
        x.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(), out.mutable_data_ptr<scalar_t>(),
        static_cast<at::opmath_type<scalar_t>>(scale), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor relu_cuda(const at::Tensor& hidden_pre) {
  const auto x = hidden_pre.contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_cuda", [&] {
    DUALENC_LAUNCH(relu_kernel<scalar_t>, blocks_for(n), kThreads, 0, stream)(x.const_data_ptr<scalar_t>(),
                                                                    out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> relu_backward_cuda(const at::Tensor& dh, const at::Tensor& hidden_pre,
                                                      const std::optional<at::Tensor>& grad_hidden_pre) {
  const auto g = dh.contiguous();
  const auto x = hidden_pre.contiguous();
  const bool extra = grad_hidden_pre.has_value() && grad_hidden_pre->defined();
  const auto gx = extra ? grad_hidden_pre->contiguous() : at::Tensor();
  auto dpre = at::empty_like(x);
  auto h = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return {dpre, h};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_backward_cuda", [&] {
    DUALENC_LAUNCH(relu_backward_kernel<scalar_t>, blocks_for(n), kThreads, 0, stream)(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        extra ? gx.const_data_ptr<scalar_t>() : nullptr, dpre.mutable_data_ptr<scalar_t>(),
        h.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dpre, h};
}

const MlpElementwise kCuda{&apply_dropout_cuda, &relu_cuda, &relu_backward_cuda};

std::tuple<at::Tensor, at::Tensor> integration_mlp_cuda(const at::Tensor& p,   // [B, K]
                                                        const at::Tensor& w1,  // [H, K]
                                                        const at::Tensor& b1,  // [H]
                                                        const at::Tensor& w2,  // [d, H]
                                                        const at::Tensor& b2,  // [d]
                                                        const std::optional<at::Tensor>& mask,  // [B, K] bool
                                                        double scale) {
  const c10::cuda::CUDAGuard guard(p.device());
  return integration_mlp_forward_impl(p, w1, b1, w2, b2, mask, scale, kCuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> integration_mlp_backward_cuda(
    const at::Tensor& grad_out,                         // [B, d]
    const std::optional<at::Tensor>& grad_hidden_pre,   // [B, H] or None
    const at::Tensor& p,                                // [B, K]
    const at::Tensor& hidden_pre,                       // [B, H]
    const at::Tensor& w1,                               // [H, K]
    const at::Tensor& w2,                               // [d, H]
    const std::optional<at::Tensor>& mask,              // [B, K] bool or None
    double scale) {
  const c10::cuda::CUDAGuard guard(p.device());
  return integration_mlp_backward_impl(grad_out, grad_hidden_pre, p, hidden_pre, w1, w2, mask, scale, kCuda);
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("integration_mlp", &dualenc_fast::cuda::integration_mlp_cuda);
  m.impl("integration_mlp_backward", &dualenc_fast::cuda::integration_mlp_backward_cuda);
}
