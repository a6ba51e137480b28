// CUDA kernels of sparse_decode and its backward: the shared host code
// (ops/sparse_impl.h) on the CUDA primitives (ops/cuda/primitives.cuh), under
// a device guard, on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/cuda/primitives.cuh"
#include "ops/sparse_impl.h"

namespace dualenc_fast::cuda {
namespace {

at::Tensor sparse_decode_cuda(const at::Tensor& values,   // [B, k]
                              const at::Tensor& indices,  // [B, k] int64
                              const at::Tensor& weight,   // [F, d]
                              const std::optional<at::Tensor>& bias,  // [d] or None
                              bool check_indices) {
  const c10::cuda::CUDAGuard guard(values.device());
  return sparse_decode_impl<Prims>(values, indices, weight, bias, check_indices);
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cuda(
    const at::Tensor& grad_out,  // [B, d]
    const at::Tensor& values,    // [B, k]
    const at::Tensor& indices,   // [B, k] int64
    const at::Tensor& weight,    // [F, d]
    bool need_values_grad, bool need_weight_grad, bool check_indices, int64_t sparse_form) {
  const c10::cuda::CUDAGuard guard(values.device());
  return sparse_decode_backward_impl<Prims>(grad_out, values, indices, weight, need_values_grad,
                                            need_weight_grad, check_indices, sparse_form);
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("sparse_decode", &dualenc_fast::cuda::sparse_decode_cuda);
  m.impl("sparse_decode_backward", &dualenc_fast::cuda::sparse_decode_backward_cuda);
}
