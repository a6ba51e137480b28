#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dualenc_fast {
// The checked arguments of sparse_weight_grads: which gradients are wanted and
// the shared width d of the row tensors (grad_dec, grad_lin, x; 0 when none).
struct WeightGradsArgs {
  bool dec, lin, enc;  // dW_dec, dW_lin, (dW_enc, db_enc) wanted
  int64_t B, k, F, d, n;
};
// indices [B, k] int64, values [B, k], grad_pre [B, k] or None, grad_dec,
// grad_lin and x [B, d] or None, pre_bias [d] or None, 0 <= n <= k.
WeightGradsArgs check_sparse_weight_grads_args(const at::Tensor& indices, const at::Tensor& values,
                                               const std::optional<at::Tensor>& grad_pre,
                                               const std::optional<at::Tensor>& grad_dec,
                                               const std::optional<at::Tensor>& grad_lin,
                                               const std::optional<at::Tensor>& x,
                                               const std::optional<at::Tensor>& pre_bias, int64_t num_features,
                                               int64_t n, bool check_indices = true);
}  // namespace dualenc_fast
