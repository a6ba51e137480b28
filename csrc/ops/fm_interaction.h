#pragma once
#include <ATen/core/Tensor.h>

namespace dualenc_fast {
// values [B, k], indices [B, k] int64, embeddings [F, K].
void check_fm_interaction_args(const at::Tensor& values, const at::Tensor& indices,
                               const at::Tensor& embeddings, bool check_indices = true);
void check_fm_interaction_backward_args(const at::Tensor& grad_p, const at::Tensor& values,
                                        const at::Tensor& indices, const at::Tensor& embeddings,
                                        bool check_indices = true);

// What the CPU and CUDA kernels share: checked arguments, contiguous inputs
// and allocated outputs.
struct FmCode {
  at::Tensor v, idx, E;  // [B, k], [B, k], [F, K]
  int64_t B = 0, k = 0, F = 0, K = 0;
  FmCode(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& embeddings);
};
struct FmForwardArgs : FmCode {
  at::Tensor out;  // [B, K]
  using FmCode::FmCode;
};
FmForwardArgs prepare_fm_interaction(const at::Tensor& values, const at::Tensor& indices,
                                     const at::Tensor& embeddings, bool check_indices);

struct FmBackwardArgs : FmCode {
  at::Tensor g;       // [B, K]
  at::Tensor grad_v;  // [B, k], or [0] when not needed
  at::Tensor grad_E;  // [F, K], or [0] when not needed
  using FmCode::FmCode;
};
FmBackwardArgs prepare_fm_interaction_backward(const at::Tensor& grad_p, const at::Tensor& values,
                                               const at::Tensor& indices, const at::Tensor& embeddings,
                                               bool need_values_grad, bool need_embeddings_grad,
                                               bool check_indices);
}  // namespace dualenc_fast
