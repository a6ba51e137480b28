// CUDA kernels of sparse_decode and its backward.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/cuda/primitives.cuh"
#include "ops/sparse_decode.h"

namespace dualenc_fast::cuda {
namespace {

at::Tensor sparse_decode_cuda(const at::Tensor& values,   // [B, k]
                              const at::Tensor& indices,  // [B, k] int64
                              const at::Tensor& weight,   // [F, d]
                              const std::optional<at::Tensor>& bias) {  // [d] or None
  check_sparse_decode_args(values, indices, weight, bias);
  const c10::cuda::CUDAGuard guard(values.device());
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t B = v.size(0), k = v.size(1), d = W.size(1);
  auto out = at::empty({B, d}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode_cuda", [&] {
    gather_sum<scalar_t>(v.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                         W.const_data_ptr<scalar_t>(),
                         has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                         out.mutable_data_ptr<scalar_t>(), B, k, d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cuda(
    const at::Tensor& grad_out,  // [B, d]
    const at::Tensor& values,    // [B, k]
    const at::Tensor& indices,   // [B, k] int64
    const at::Tensor& weight,    // [F, d]
    bool need_values_grad, bool need_weight_grad) {
  check_sparse_decode_backward_args(grad_out, values, indices, weight);
  const c10::cuda::CUDAGuard guard(values.device());
  const auto g = grad_out.contiguous();
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  auto grad_values = need_values_grad ? at::empty({B, k}, v.options()) : at::empty({0}, v.options());
  auto grad_weight = need_weight_grad ? at::empty({F, d}, W.options()) : at::empty({0}, W.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode_backward_cuda", [&] {
    if (need_values_grad) {
      row_dot<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                        W.const_data_ptr<scalar_t>(), grad_values.mutable_data_ptr<scalar_t>(), B, k, d);
    }
    if (need_weight_grad) {
      const FeatureCsr csr(idx, F);
      scatter_rows<scalar_t>(csr, v.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                             grad_weight.mutable_data_ptr<scalar_t>(), nullptr, F, k, d);
    }
  });
  return {grad_values, grad_weight};
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("sparse_decode", &dualenc_fast::cuda::sparse_decode_cuda);
  m.impl("sparse_decode_backward", &dualenc_fast::cuda::sparse_decode_backward_cuda);
}
