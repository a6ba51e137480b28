// Schema: sparse_decode — out[b] = bias + sum_j values[b, j] * weight[indices[b, j]].
#include "ops/sparse_decode.h"

#include <torch/library.h>

#include "checks.h"

namespace dualenc_fast {

void check_sparse_decode_args(const at::Tensor& values, const at::Tensor& indices,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              bool check_indices) {
  check_sparse_code(values, indices);
  check_dim(weight, "weight", 2, "[F, d]");
  check_matches(weight, "weight", values, "values");
  check_optional_vector(bias, "bias", "[d]", weight.size(1), "weight.shape[1] (d)", values, "values");
  if (check_indices) {
    check_index_range(indices, "indices", weight.size(0), "weight.shape[0], the number of features");
  }
}

void check_sparse_decode_backward_args(const at::Tensor& grad_out, const at::Tensor& values,
                                       const at::Tensor& indices, const at::Tensor& weight,
                                       bool check_indices) {
  check_sparse_decode_args(values, indices, weight, std::nullopt, check_indices);
  check_dim(grad_out, "grad_out", 2, "[B, d]");
  check_size(grad_out, "grad_out", 0, values.size(0), "values.shape[0] (B)");
  check_size(grad_out, "grad_out", 1, weight.size(1), "weight.shape[1] (d)");
  check_matches(grad_out, "grad_out", values, "values");
}

}  // namespace dualenc_fast

TORCH_LIBRARY_FRAGMENT(dualenc_fast, m) {
  // check_indices=False skips the index range check (a device sync on CUDA)
  // for indices produced by this package's own selection.
  m.def(
      "sparse_decode(Tensor values, Tensor indices, Tensor weight, Tensor? bias, bool check_indices=True) "
      "-> Tensor");
  // Returns (grad_values [B, k] or [0], grad_weight [F, d] or [0]). The
  // autograd formula passes check_indices=False: its indices passed the
  // forward's check (or came from topk_encode). sparse_form: the gather/dense
  // form the forward recorded (0 gather, n > 0 dense in blocks of ~n bytes),
  // or -1 for the form the current strategy picks.
  m.def(
      "sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor weight, "
      "bool need_values_grad, bool need_weight_grad, bool check_indices=True, int sparse_form=-1) "
      "-> (Tensor, Tensor)");
}
