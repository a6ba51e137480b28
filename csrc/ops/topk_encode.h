#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dualenc_fast {
// x [B, d], weight [F, d], bias [F], 0 < k <= F, pre_bias [d] or None.
void check_topk_encode_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            int64_t k, const std::optional<at::Tensor>& pre_bias);
void check_topk_encode_backward_args(const at::Tensor& grad_values, const at::Tensor& values,
                                     const at::Tensor& indices, const at::Tensor& x,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& pre_bias,
                                     bool check_indices = true);
// What the CPU and CUDA forward kernels share: checked arguments, the centered
// input, contiguous weights and the allocated outputs.
struct TopkEncodeArgs {
  at::Tensor xe, W, b;      // x - pre_bias [B, d], weight [F, d], bias [F]
  at::Tensor values;        // [B, k]
  at::Tensor indices;       // [B, k] int64
  int64_t B, F;
};
TopkEncodeArgs prepare_topk_encode(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                   int64_t k, const std::optional<at::Tensor>& pre_bias);
// x - pre_bias (or x), contiguous.
at::Tensor centered_input(const at::Tensor& x, const std::optional<at::Tensor>& pre_bias);
// Rows per encoder GEMM block so that one [rows, F] block stays near `bytes`.
int64_t encode_block_rows(int64_t B, int64_t F, int64_t elem_size, int64_t bytes);
}  // namespace dualenc_fast
