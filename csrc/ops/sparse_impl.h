// Host-side orchestration shared by the CPU and CUDA kernels of the sparse
// ops: argument checks, layout, allocation and dtype dispatch. `Prims` supplies
// the device primitives (cpu::Prims in cpu/primitives.h, cuda::Prims in
// cuda/primitives.cuh):
//   gather_sum<T>(coef, idx, W, bias, out, B, k, d)   out[b] = bias + sum_j coef[b,j] W[idx[b,j]]
//   row_dot<T>(g, idx, W, out, B, k, d)               out[b,j] = <g[b], W[idx[b,j]]>
//   Csr(idx tensor, F)                                the code's transpose, grouped by feature
//   scatter_rows<T>(csr, coef, y, dW, dsum, F, k, d)  dW[i] = sum_{idx=i} coef * y[b]
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/mul.h>

#include <tuple>

#include "ops/sparse_decode.h"
#include "ops/topk_encode.h"

namespace dualenc_fast {

template <typename Prims>
at::Tensor sparse_decode_impl(const at::Tensor& values,   // [B, k]
                              const at::Tensor& indices,  // [B, k] int64
                              const at::Tensor& weight,   // [F, d]
                              const std::optional<at::Tensor>& bias) {  // [d] or None
  check_sparse_decode_args(values, indices, weight, bias);
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t B = v.size(0), k = v.size(1), d = W.size(1);
  auto out = at::empty({B, d}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode", [&] {
    Prims::template gather_sum<scalar_t>(v.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                         W.const_data_ptr<scalar_t>(),
                                         has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                         out.mutable_data_ptr<scalar_t>(), B, k, d);
  });
  return out;
}

template <typename Prims>
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_impl(
    const at::Tensor& grad_out,  // [B, d]
    const at::Tensor& values,    // [B, k]
    const at::Tensor& indices,   // [B, k] int64
    const at::Tensor& weight,    // [F, d]
    bool need_values_grad, bool need_weight_grad) {
  check_sparse_decode_backward_args(grad_out, values, indices, weight);
  const auto g = grad_out.contiguous();
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  auto grad_values = need_values_grad ? at::empty({B, k}, v.options()) : at::empty({0}, v.options());
  auto grad_weight = need_weight_grad ? at::empty({F, d}, W.options()) : at::empty({0}, W.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode_backward", [&] {
    if (need_values_grad) {
      Prims::template row_dot<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                        W.const_data_ptr<scalar_t>(),
                                        grad_values.mutable_data_ptr<scalar_t>(), B, k, d);
    }
    if (need_weight_grad) {
      const typename Prims::Csr csr(idx, F);
      Prims::template scatter_rows<scalar_t>(csr, v.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                             grad_weight.mutable_data_ptr<scalar_t>(), nullptr, F, k, d);
    }
  });
  return {grad_values, grad_weight};
}

template <typename Prims>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_impl(
    const at::Tensor& grad_values,  // [B, k]
    const at::Tensor& values,       // [B, k]
    const at::Tensor& indices,      // [B, k] int64
    const at::Tensor& x,            // [B, d]
    const at::Tensor& weight,       // [F, d]
    const std::optional<at::Tensor>& pre_bias,  // [d] or None
    bool need_x_grad, bool need_weight_grad) {
  check_topk_encode_backward_args(grad_values, values, indices, x, weight, pre_bias);
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  // a selected value that ReLU clamped to zero passes no gradient
  const auto g = at::mul(grad_values, at::gt(v, 0)).contiguous();
  auto grad_x = need_x_grad ? at::empty({B, d}, v.options()) : at::empty({0}, v.options());
  auto grad_w = need_weight_grad ? at::empty({F, d}, v.options()) : at::empty({0}, v.options());
  auto grad_b = need_weight_grad ? at::empty({F}, v.options()) : at::empty({0}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "topk_encode_backward", [&] {
    if (need_x_grad) {
      Prims::template gather_sum<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                           W.const_data_ptr<scalar_t>(), nullptr,
                                           grad_x.mutable_data_ptr<scalar_t>(), B, k, d);
    }
    if (need_weight_grad) {
      const auto xe = centered_input(x, pre_bias);
      const typename Prims::Csr csr(idx, F);
      Prims::template scatter_rows<scalar_t>(csr, g.const_data_ptr<scalar_t>(), xe.const_data_ptr<scalar_t>(),
                                             grad_w.mutable_data_ptr<scalar_t>(),
                                             grad_b.mutable_data_ptr<scalar_t>(), F, k, d);
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace dualenc_fast
