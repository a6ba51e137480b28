// Schema: dense_code — the dense [B, F] layout of a sparse code:
// out[b, indices[b, j]] += values[b, j], zeros elsewhere (repeated indices add
// up). The CPU kernel (cpu/dense_code_cpu.cpp) writes it in one pass per row
// into memory from the buffer cache; other devices zero, then scatter-add.
#include "ops/dense_code.h"

#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"

namespace dualenc_fast {

void check_dense_code_args(const at::Tensor& values, const at::Tensor& indices, int64_t num_features,
                           bool check_indices) {
  check_sparse_code(values, indices);
  TORCH_CHECK_VALUE(num_features >= 1, "dualenc_fast: argument 'num_features' must be >= 1, got ",
                    num_features);
  if (check_indices) check_index_range(indices, "indices", num_features, "num_features");
}

namespace {
at::Tensor dense_code_generic(const at::Tensor& values, const at::Tensor& indices, int64_t num_features,
                              bool check_indices) {
  check_dense_code_args(values, indices, num_features, check_indices);
  return at::zeros({values.size(0), num_features}, values.options()).scatter_add_(1, indices, values);
}
}  // namespace

}  // namespace dualenc_fast

TORCH_LIBRARY_FRAGMENT(dualenc_fast, m) {
  // The backward is a gather of the dense gradient (dualenc_fast/ops.py).
  m.def("dense_code(Tensor values, Tensor indices, int num_features, bool check_indices=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("dense_code", &dualenc_fast::dense_code_generic);
}
