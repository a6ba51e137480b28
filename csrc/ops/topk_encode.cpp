// Schema: topk_encode — ReLU((x - pre_bias) @ weight.T + bias), then the k
// largest entries of each row as (values [B, k], indices [B, k] int64).
// Tie rule: equal pre-activations rank by lower feature index; each output row
// is sorted by value descending, then index ascending. A NaN pre-activation
// ranks first, above +Inf (as torch.topk; NaNs among themselves by lower
// index), and the NaN is written to `values`: CPU and CUDA alike. In 16 bits
// x @ weight.T + bias is rounded once (CUDA addmm; CPU GEMM then a float32
// bias add) where the reference rounds twice: indices may differ from the
// reference's only between values within one rounding of each other (README).
#include "ops/topk_encode.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sub.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace dualenc_fast {

void check_topk_encode_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            int64_t k, const std::optional<at::Tensor>& pre_bias) {
  check_dim(x, "x", 2, "[B, d]");
  check_floating(x, "x");
  check_dim(weight, "weight", 2, "[F, d]");
  check_matches(weight, "weight", x, "x");
  check_size(weight, "weight", 1, x.size(1), "x.shape[1] (d)");
  check_dim(bias, "bias", 1, "[F]");
  check_matches(bias, "bias", x, "x");
  check_size(bias, "bias", 0, weight.size(0), "weight.shape[0] (F)");
  TORCH_CHECK_VALUE(k > 0 && k <= weight.size(0), "dualenc_fast: argument 'k' must satisfy ",
                    "0 < k <= F = ", weight.size(0), ", got k = ", k);
  check_optional_vector(pre_bias, "pre_bias", "[d]", x.size(1), "x.shape[1] (d)", x, "x");
}

void check_topk_encode_backward_args(const at::Tensor& grad_values, const at::Tensor& values,
                                     const at::Tensor& indices, const at::Tensor& x,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& pre_bias,
                                     bool check_indices) {
  check_sparse_code(values, indices);
  check_dim(grad_values, "grad_values", 2, "[B, k]");
  TORCH_CHECK_VALUE(grad_values.sizes() == values.sizes(), "dualenc_fast: argument 'grad_values' ",
                    "must have the shape of 'values' ", values.sizes(), ", got ", describe(grad_values));
  check_matches(grad_values, "grad_values", values, "values");
  check_dim(x, "x", 2, "[B, d]");
  check_matches(x, "x", values, "values");
  check_size(x, "x", 0, values.size(0), "values.shape[0] (B)");
  check_dim(weight, "weight", 2, "[F, d]");
  check_matches(weight, "weight", values, "values");
  check_size(weight, "weight", 1, x.size(1), "x.shape[1] (d)");
  check_optional_vector(pre_bias, "pre_bias", "[d]", x.size(1), "x.shape[1] (d)", values, "values");
  if (check_indices) {
    check_index_range(indices, "indices", weight.size(0), "weight.shape[0], the number of features");
  }
}

at::Tensor centered_input(const at::Tensor& x, const std::optional<at::Tensor>& pre_bias) {
  if (pre_bias.has_value() && pre_bias->defined()) return at::sub(x, *pre_bias).contiguous();
  return x.contiguous();
}

TopkEncodeArgs prepare_topk_encode(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                   int64_t k, const std::optional<at::Tensor>& pre_bias) {
  check_topk_encode_args(x, weight, bias, k, pre_bias);
  TopkEncodeArgs a;
  a.xe = centered_input(x, pre_bias);
  a.W = weight.contiguous();
  a.b = bias.contiguous();
  a.B = a.xe.size(0);
  a.F = a.W.size(0);
  a.values = at::empty({a.B, k}, a.xe.options());
  a.indices = at::empty({a.B, k}, a.xe.options().dtype(at::kLong));
  return a;
}

int64_t encode_block_rows(int64_t B, int64_t F, int64_t elem_size, int64_t bytes) {
  const int64_t rows = bytes / std::max<int64_t>(1, F * elem_size);
  return std::max<int64_t>(1, std::min<int64_t>(B, rows));
}

}  // namespace dualenc_fast

TORCH_LIBRARY_FRAGMENT(dualenc_fast, m) {
  m.def("topk_encode(Tensor x, Tensor weight, Tensor bias, int k, Tensor? pre_bias) -> (Tensor, Tensor)");
  // Returns (grad_x [B, d] or [0], grad_weight [F, d] or [0], grad_bias [F] or [0]).
  // sparse_form as in sparse_decode_backward (the form the forward recorded).
  m.def(
      "topk_encode_backward(Tensor grad_values, Tensor values, Tensor indices, Tensor x, "
      "Tensor weight, Tensor? pre_bias, bool need_x_grad, bool need_weight_grad, "
      "bool check_indices=True, int sparse_form=-1) "
      "-> (Tensor, Tensor, Tensor)");
}
