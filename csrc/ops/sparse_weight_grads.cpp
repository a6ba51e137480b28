// Schema: sparse_weight_grads — the weight gradients of every product of one
// sparse code (values, indices) [B, k] in one feature-major pass:
//   dW_dec[i] = sum over pairs (b, j) with indices[b, j] = i of values[b, j] * grad_dec[b]
//   dW_lin[i] = the same over the pairs with j < n, of values[b, j] * grad_lin[b]
//   dW_enc[i] = sum over the pairs of grad_pre[b, j] * (x[b] - pre_bias)
//   db_enc[i] = sum over the pairs of grad_pre[b, j]
// (the decoder's, the NFM linear part's on the code's first n columns, and the
// encoder's, with grad_pre the gradient of the selected pre-activations).
#include "ops/sparse_weight_grads.h"

#include <torch/library.h>

#include <string>

#include "checks.h"

namespace dualenc_fast {
namespace {

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A [B, d] row tensor: B from values, d from the first present one.
void check_rows(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& values, int64_t& d,
                const char*& d_from) {
  if (!present(t)) return;
  check_dim(*t, name, 2, "[B, d]");
  check_matches(*t, name, values, "values");
  check_size(*t, name, 0, values.size(0), "values.shape[0] (B)");
  if (d_from) {
    check_size(*t, name, 1, d, (std::string(d_from) + ".shape[1] (d)").c_str());
  } else {
    d = t->size(1);
    d_from = name;
  }
}

}  // namespace

WeightGradsArgs check_sparse_weight_grads_args(const at::Tensor& indices, const at::Tensor& values,
                                               const std::optional<at::Tensor>& grad_pre,
                                               const std::optional<at::Tensor>& grad_dec,
                                               const std::optional<at::Tensor>& grad_lin,
                                               const std::optional<at::Tensor>& x,
                                               const std::optional<at::Tensor>& pre_bias, int64_t num_features,
                                               int64_t n, bool check_indices) {
  check_sparse_code(values, indices);
  WeightGradsArgs a{};
  a.B = values.size(0);
  a.k = values.size(1);
  a.F = num_features;
  a.n = n;
  TORCH_CHECK_VALUE(num_features >= 0, "dualenc_fast: argument 'num_features' must be >= 0, got ", num_features);
  TORCH_CHECK_VALUE(n >= 0 && n <= a.k, "dualenc_fast: argument 'n' must satisfy 0 <= n <= k = ", a.k,
                    " (values.shape[1]), got n = ", n);
  if (present(grad_pre)) {
    check_dim(*grad_pre, "grad_pre", 2, "[B, k]");
    TORCH_CHECK_VALUE(grad_pre->sizes() == values.sizes(), "dualenc_fast: argument 'grad_pre' must have the ",
                      "shape of 'values' ", values.sizes(), ", got ", describe(*grad_pre));
    check_matches(*grad_pre, "grad_pre", values, "values");
  }
  // the row tensors share d, named after the first present one
  const char* d_from = nullptr;
  int64_t d = 0;
  check_rows(grad_dec, "grad_dec", values, d, d_from);
  check_rows(grad_lin, "grad_lin", values, d, d_from);
  check_rows(x, "x", values, d, d_from);
  if (present(pre_bias)) {
    const std::string what = d_from ? std::string(d_from) + ".shape[1] (d)" : std::string("its own length");
    check_optional_vector(pre_bias, "pre_bias", "[d]", d_from ? d : pre_bias->size(0), what.c_str(), values,
                          "values");
  }
  a.d = d;
  a.dec = present(grad_dec);
  a.lin = present(grad_lin);
  a.enc = present(grad_pre) && present(x);
  if (check_indices) check_index_range(indices, "indices", num_features, "num_features");
  return a;
}

}  // namespace dualenc_fast

TORCH_LIBRARY_FRAGMENT(dualenc_fast, m) {
  // Returns (dW_dec [F, d], dW_lin [F, d], dW_enc [F, d], db_enc [F]); a
  // gradient whose input is None comes back as an empty [0] tensor (dW_enc
  // and db_enc need grad_pre and x). Each row of values is sorted by value,
  // descending, so the NFM's top-n code is its first n columns. sparse_form as
  // in sparse_decode_backward: the form the forward recorded, or -1.
  m.def(
      "sparse_weight_grads(Tensor indices, Tensor values, Tensor? grad_pre, Tensor? grad_dec, "
      "Tensor? grad_lin, Tensor? x, Tensor? pre_bias, int num_features, int n, bool check_indices=True, "
      "int sparse_form=-1) -> (Tensor, Tensor, Tensor, Tensor)");
}
