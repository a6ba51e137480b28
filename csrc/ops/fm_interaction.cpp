// Schema: fm_interaction — FM pooling of a sparse code over feature embeddings:
//   s = sum_j v_j E[i_j],  q = sum_j (v_j E[i_j])^2,  p = 0.5 * (s^2 - q)   (K-wide)
// backward: dv_j = <dp, E[i_j] * (s - v_j E[i_j])>,
//           dE[i] += v_j * dp * (s - v_j E[i])   (deterministic, grouped by feature)
#include "ops/fm_interaction.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "buffer_cache.h"
#include "checks.h"

namespace dualenc_fast {

void check_fm_interaction_args(const at::Tensor& values, const at::Tensor& indices,
                               const at::Tensor& embeddings, bool check_indices) {
  check_sparse_code(values, indices);
  check_dim(embeddings, "embeddings", 2, "[F, K]");
  check_matches(embeddings, "embeddings", values, "values");
  if (check_indices) {
    check_index_range(indices, "indices", embeddings.size(0), "embeddings.shape[0], the number of features");
  }
}

void check_fm_interaction_backward_args(const at::Tensor& grad_p, const at::Tensor& values,
                                        const at::Tensor& indices, const at::Tensor& embeddings,
                                        bool check_indices) {
  check_fm_interaction_args(values, indices, embeddings, check_indices);
  check_dim(grad_p, "grad_p", 2, "[B, K]");
  check_size(grad_p, "grad_p", 0, values.size(0), "values.shape[0] (B)");
  check_size(grad_p, "grad_p", 1, embeddings.size(1), "embeddings.shape[1] (K)");
  check_matches(grad_p, "grad_p", values, "values");
}

FmCode::FmCode(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& embeddings)
    : v(values.contiguous()),
      idx(indices.contiguous()),
      E(embeddings.contiguous()),
      B(v.size(0)),
      k(v.size(1)),
      F(E.size(0)),
      K(E.size(1)) {}

FmForwardArgs prepare_fm_interaction(const at::Tensor& values, const at::Tensor& indices,
                                     const at::Tensor& embeddings, bool check_indices) {
  check_fm_interaction_args(values, indices, embeddings, check_indices);
  FmForwardArgs a(values, indices, embeddings);
  a.out = at::empty({a.B, a.K}, a.v.options());
  return a;
}

FmBackwardArgs prepare_fm_interaction_backward(const at::Tensor& grad_p, const at::Tensor& values,
                                               const at::Tensor& indices, const at::Tensor& embeddings,
                                               bool need_values_grad, bool need_embeddings_grad,
                                               bool check_indices) {
  check_fm_interaction_backward_args(grad_p, values, indices, embeddings, check_indices);
  FmBackwardArgs a(values, indices, embeddings);
  a.g = grad_p.contiguous();
  a.grad_v = need_values_grad ? at::empty({a.B, a.k}, a.v.options()) : at::empty({0}, a.v.options());
  a.grad_E = need_embeddings_grad ? empty_cached({a.F, a.K}, a.E.options()) : at::empty({0}, a.E.options());
  return a;
}

}  // namespace dualenc_fast

TORCH_LIBRARY_FRAGMENT(dualenc_fast, m) {
  m.def("fm_interaction(Tensor values, Tensor indices, Tensor embeddings, bool check_indices=True) -> Tensor");
  // Returns (grad_values [B, k] or [0], grad_embeddings [F, K] or [0]); the
  // autograd formula passes check_indices=False (the forward checked them).
  m.def(
      "fm_interaction_backward(Tensor grad_p, Tensor values, Tensor indices, Tensor embeddings, "
      "bool need_values_grad, bool need_embeddings_grad, bool check_indices=True) -> (Tensor, Tensor)");
}
