// CUDA kernels of sparse_decode and its backward: the shared host code
// (ops/sparse_impl.h) on the CUDA primitives (ops/cuda/primitives.cuh), under
// a device guard, on the current stream. The forward has a third form, the
// batch-tiled kernel (ops/cuda/tiled_decode_cuda.cu), where use_tiled_forward
// (strategy.h) picks it; it is forward-only, so the backward's form stays the
// gather or dense one the forward recorded. When the backward needs dvalues in
// the gather form it makes one feature-major pass instead (dot_scatter_rows,
// with dW too when wanted): each weight row is read once per work item, and
// each pair's g row serves its dvalue and its dW term together, where row_dot
// read a weight row per pair and scatter_rows the g rows again. dvalues alone
// take the same kernel, so they are bit for bit those of the pass with dW.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/cuda/primitives.cuh"
#include "ops/cuda/tiled_decode.h"
#include "ops/sparse_impl.h"
#include "strategy.h"

namespace dualenc_fast::cuda {
namespace {

at::Tensor sparse_decode_cuda(const at::Tensor& values,   // [B, k]
                              const at::Tensor& indices,  // [B, k] int64
                              const at::Tensor& weight,   // [F, d]
                              const std::optional<at::Tensor>& bias,  // [d] or None
                              bool check_indices) {
  const c10::cuda::CUDAGuard guard(values.device());
  check_sparse_decode_args(values, indices, weight, bias, check_indices);
  const auto t = values.scalar_type();
  // the CUDA rule even in the emulated build, whose tensors live on the CPU
  if (use_tiled_forward(/*on_cpu=*/false, t == at::kHalf || t == at::kBFloat16, t == at::kFloat, values.size(0),
                        values.size(1), weight.size(0))) {
    return tiled_decode(values, indices, weight, bias);
  }
  return sparse_decode_impl<Prims>(values, indices, weight, bias, /*check_indices=*/false);
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cuda(
    const at::Tensor& grad_out,  // [B, d]
    const at::Tensor& values,    // [B, k]
    const at::Tensor& indices,   // [B, k] int64
    const at::Tensor& weight,    // [F, d]
    bool need_values_grad, bool need_weight_grad, bool check_indices, int64_t sparse_form) {
  const c10::cuda::CUDAGuard guard(values.device());
  check_sparse_decode_backward_args(grad_out, values, indices, weight, check_indices);
  if (!need_values_grad || resolve_sparse_form(sparse_form, values, values.size(1), weight.size(0)) > 0) {
    return sparse_decode_backward_impl<Prims>(grad_out, values, indices, weight, need_values_grad,
                                              need_weight_grad, /*check_indices=*/false, sparse_form);
  }
  const auto g = grad_out.contiguous();
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  auto grad_values = at::empty({B, k}, v.options());
  auto grad_weight = need_weight_grad ? at::empty({F, d}, W.options()) : at::empty({0}, W.options());
  if (F == 0) return {grad_values, grad_weight};  // then there are no pairs (B * k == 0)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode_backward_cuda", [&] {
    const auto csr_p = shared_csr<FeatureCsr>(indices, F, [&] { return FeatureCsr(idx, F); });
    const auto& csr = *csr_p;
    dot_scatter_rows<scalar_t>(csr, g.const_data_ptr<scalar_t>(),
                               need_weight_grad ? v.const_data_ptr<scalar_t>() : nullptr,
                               W.const_data_ptr<scalar_t>(), grad_values.mutable_data_ptr<scalar_t>(),
                               need_weight_grad ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr, d);
  });
  return {grad_values, grad_weight};
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("sparse_decode", &dualenc_fast::cuda::sparse_decode_cuda);
  m.impl("sparse_decode_backward", &dualenc_fast::cuda::sparse_decode_backward_cuda);
}
