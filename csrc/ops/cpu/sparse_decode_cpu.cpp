// CPU kernels of sparse_decode and its backward: the shared host code
// (ops/sparse_impl.h) on the CPU primitives (ops/cpu/primitives.h). When the
// backward needs both gradients in the gather form it makes one
// feature-major pass instead (dot_scatter_rows): each weight row is read once,
// in order, and each pair's g row serves its dvalue and its dW term together.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "buffer_cache.h"
#include "ops/cpu/primitives.h"
#include "ops/sparse_impl.h"

namespace dualenc_fast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cpu(const at::Tensor& grad_out,  // [B, d]
                                                              const at::Tensor& values,    // [B, k]
                                                              const at::Tensor& indices,   // [B, k]
                                                              const at::Tensor& weight,    // [F, d]
                                                              bool need_values_grad, bool need_weight_grad,
                                                              bool check_indices, int64_t sparse_form) {
  if (!need_weight_grad || resolve_sparse_form(sparse_form, values, values.size(1), weight.size(0)) > 0) {
    return sparse_decode_backward_impl<Prims>(grad_out, values, indices, weight, need_values_grad,
                                              need_weight_grad, check_indices, sparse_form);
  }
  check_sparse_decode_backward_args(grad_out, values, indices, weight, check_indices);
  const auto g = grad_out.contiguous();
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  auto grad_values = need_values_grad ? at::empty({B, k}, v.options()) : at::empty({0}, v.options());
  auto grad_weight = empty_cached({F, d}, W.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode_backward_cpu", [&] {
    const auto csr_p = shared_csr<FeatureCsr>(indices, F, [&] { return FeatureCsr(idx, F); });
    const auto& csr = *csr_p;
    if (need_values_grad) {
      dot_scatter_rows<scalar_t>(csr, g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                 W.const_data_ptr<scalar_t>(), grad_values.mutable_data_ptr<scalar_t>(),
                                 grad_weight.mutable_data_ptr<scalar_t>(), d);
    } else {
      scatter_rows<scalar_t>(csr, v.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                             grad_weight.mutable_data_ptr<scalar_t>(), nullptr, F, k, d);
    }
  });
  return {grad_values, grad_weight};
}

}  // namespace
}  // namespace dualenc_fast::cpu

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("sparse_decode", &dualenc_fast::sparse_decode_impl<dualenc_fast::cpu::Prims>);
  m.impl("sparse_decode_backward", &dualenc_fast::cpu::sparse_decode_backward_cpu);
}
