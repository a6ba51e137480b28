#pragma once
#include <ATen/core/Tensor.h>

namespace dualenc_fast {
// values [B, k], indices [B, k] int64, embeddings [F, K].
void check_fm_interaction_args(const at::Tensor& values, const at::Tensor& indices,
                               const at::Tensor& embeddings, bool check_indices = true);
void check_fm_interaction_backward_args(const at::Tensor& grad_p, const at::Tensor& values,
                                        const at::Tensor& indices, const at::Tensor& embeddings,
                                        bool check_indices = true);
}  // namespace dualenc_fast
