#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace dualenc_fast {

// The element-wise passes of the integration MLP, one implementation per device.
struct MlpElementwise {
  // mask ? p * scale : 0            (p [B, K], mask [B, K] bool)
  at::Tensor (*apply_dropout)(const at::Tensor& p, const at::Tensor& mask, double scale);
  // max(hidden_pre, 0)
  at::Tensor (*relu)(const at::Tensor& hidden_pre);
  // (dh_pre, h) = (hidden_pre > 0 ? dh : 0) + grad_hidden_pre, max(hidden_pre, 0), in one pass
  std::tuple<at::Tensor, at::Tensor> (*relu_backward)(const at::Tensor& dh, const at::Tensor& hidden_pre,
                                                      const std::optional<at::Tensor>& grad_hidden_pre);
};

// (out [B, d], hidden_pre [B, H])
std::tuple<at::Tensor, at::Tensor> integration_mlp_forward_impl(
    const at::Tensor& p, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const std::optional<at::Tensor>& mask, double scale, const MlpElementwise& ew);

// (dp, dw1, db1, dw2, db2)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> integration_mlp_backward_impl(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_hidden_pre, const at::Tensor& p,
    const at::Tensor& hidden_pre, const at::Tensor& w1, const at::Tensor& w2,
    const std::optional<at::Tensor>& mask, double scale, const MlpElementwise& ew);

}  // namespace dualenc_fast
