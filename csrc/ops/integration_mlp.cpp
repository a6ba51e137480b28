// Schema: integration_mlp — out = w2 @ ReLU(w1 @ Dropout(p) + b1) + b2 per row.
// Dropout is given as a keep-mask and a scale (1 / (1 - rate)), so the op is
// deterministic and the backward reapplies the very same mask. The op also
// returns the hidden pre-activation [B, H] (saved for backward; the
// integration-feature analysis reads it). The GEMMs go to ATen (MKL/cuBLAS);
// the mask and ReLU passes are the device kernels in cpu/ and cuda/.
#include "ops/integration_mlp.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "checks.h"

namespace dualenc_fast {
namespace {

void check_mlp_weights(const at::Tensor& p, const at::Tensor& w1, const at::Tensor& w2) {
  check_dim(p, "p", 2, "[B, K]");
  check_floating(p, "p");
  check_dim(w1, "w1", 2, "[H, K]");
  check_matches(w1, "w1", p, "p");
  check_size(w1, "w1", 1, p.size(1), "p.shape[1] (K)");
  check_dim(w2, "w2", 2, "[d, H]");
  check_matches(w2, "w2", p, "p");
  check_size(w2, "w2", 1, w1.size(0), "w1.shape[0] (H)");
}

void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& p, double scale) {
  TORCH_CHECK_VALUE(scale >= 0.0, "dualenc_fast: argument 'scale' must be >= 0, got ", scale);
  if (!mask.has_value() || !mask->defined()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "dualenc_fast: argument 'mask' must be a bool ",
                   "keep-mask, got ", describe(*mask));
  TORCH_CHECK_VALUE(mask->sizes() == p.sizes(), "dualenc_fast: argument 'mask' must have the shape of ",
                    "'p' ", p.sizes(), ", got ", describe(*mask));
  check_same_device(*mask, "mask", p, "p");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> integration_mlp_forward_impl(
    const at::Tensor& p, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const std::optional<at::Tensor>& mask, double scale, const MlpElementwise& ew) {
  check_mlp_weights(p, w1, w2);
  check_dim(b1, "b1", 1, "[H]");
  check_size(b1, "b1", 0, w1.size(0), "w1.shape[0] (H)");
  check_matches(b1, "b1", p, "p");
  check_dim(b2, "b2", 1, "[d]");
  check_size(b2, "b2", 0, w2.size(0), "w2.shape[0] (d)");
  check_matches(b2, "b2", p, "p");
  check_mask(mask, p, scale);
  const bool drop = mask.has_value() && mask->defined();
  const auto pd = drop ? ew.apply_dropout(p, *mask, scale) : p;
  auto hidden_pre = at::addmm(b1, pd, w1.t());
  auto out = at::addmm(b2, ew.relu(hidden_pre), w2.t());
  return {out, hidden_pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> integration_mlp_backward_impl(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_hidden_pre, const at::Tensor& p,
    const at::Tensor& hidden_pre, const at::Tensor& w1, const at::Tensor& w2,
    const std::optional<at::Tensor>& mask, double scale, const MlpElementwise& ew) {
  check_mlp_weights(p, w1, w2);
  check_mask(mask, p, scale);
  check_dim(grad_out, "grad_out", 2, "[B, d]");
  check_size(grad_out, "grad_out", 0, p.size(0), "p.shape[0] (B)");
  check_size(grad_out, "grad_out", 1, w2.size(0), "w2.shape[0] (d)");
  check_matches(grad_out, "grad_out", p, "p");
  check_dim(hidden_pre, "hidden_pre", 2, "[B, H]");
  check_size(hidden_pre, "hidden_pre", 0, p.size(0), "p.shape[0] (B)");
  check_size(hidden_pre, "hidden_pre", 1, w1.size(0), "w1.shape[0] (H)");
  check_matches(hidden_pre, "hidden_pre", p, "p");
  if (grad_hidden_pre.has_value() && grad_hidden_pre->defined()) {
    TORCH_CHECK_VALUE(grad_hidden_pre->sizes() == hidden_pre.sizes(), "dualenc_fast: argument ",
                      "'grad_hidden_pre' must have the shape of 'hidden_pre' ", hidden_pre.sizes(),
                      ", got ", describe(*grad_hidden_pre));
    check_matches(*grad_hidden_pre, "grad_hidden_pre", p, "p");
  }
  const bool drop = mask.has_value() && mask->defined();
  // ReLU mask and the optional gradient of hidden_pre in one pass; h for dw2
  auto [dh, h] = ew.relu_backward(at::mm(grad_out, w2), hidden_pre, grad_hidden_pre);
  auto dw2 = at::mm(grad_out.t(), h);
  auto db2 = at::sum(grad_out, 0);
  const auto pd = drop ? ew.apply_dropout(p, *mask, scale) : p;
  auto dw1 = at::mm(dh.t(), pd);
  auto db1 = at::sum(dh, 0);
  auto dpd = at::mm(dh, w1);
  auto dp = drop ? ew.apply_dropout(dpd, *mask, scale) : dpd;
  return {dp, dw1, db1, dw2, db2};
}

}  // namespace dualenc_fast

TORCH_LIBRARY_FRAGMENT(dualenc_fast, m) {
  m.def(
      "integration_mlp(Tensor p, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? mask, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "integration_mlp_backward(Tensor grad_out, Tensor? grad_hidden_pre, Tensor p, "
      "Tensor hidden_pre, Tensor w1, Tensor w2, Tensor? mask, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
