#pragma once
#include <ATen/core/Tensor.h>

namespace dualenc_fast {
// values [B, k], indices [B, k] int64, num_features >= 1.
void check_dense_code_args(const at::Tensor& values, const at::Tensor& indices, int64_t num_features,
                           bool check_indices);
}  // namespace dualenc_fast
