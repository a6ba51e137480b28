// The batch-tiled forward of sparse_decode on CUDA (ops/cuda/tiled_decode_cuda.cu;
// chosen by use_tiled_forward, strategy.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace dualenc_fast::cuda {

// out [B, d] = bias + sum_j values[b, j] * weight[indices[b, j]] for checked
// arguments (check_sparse_decode_args): values [B, k], indices [B, k] int64 in
// [0, F), weight [F, d], bias [d] or None. Deterministic; summed per row in
// ascending feature order (see the .cu file).
at::Tensor tiled_decode(const at::Tensor& values,   // [B, k]
                        const at::Tensor& indices,  // [B, k] int64
                        const at::Tensor& weight,   // [F, d]
                        const std::optional<at::Tensor>& bias);  // [d] or None

}  // namespace dualenc_fast::cuda
