#pragma once
#include <ATen/core/Tensor.h>

namespace dualenc_fast {
// values [B, k], indices [B, k] int64, 0 < n <= k.
void check_topn_reselect_args(const at::Tensor& values, const at::Tensor& indices, int64_t n);
}  // namespace dualenc_fast
