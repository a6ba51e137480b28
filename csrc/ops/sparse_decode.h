#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dualenc_fast {
// values [B, k], indices [B, k] int64, weight [F, d], bias [d] or None.
void check_sparse_decode_args(const at::Tensor& values, const at::Tensor& indices,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              bool check_indices = true);
void check_sparse_decode_backward_args(const at::Tensor& grad_out, const at::Tensor& values,
                                       const at::Tensor& indices, const at::Tensor& weight,
                                       bool check_indices = true);
}  // namespace dualenc_fast
