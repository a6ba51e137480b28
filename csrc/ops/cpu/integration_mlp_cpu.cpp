// CPU element-wise passes of the integration MLP (dropout mask, ReLU, and the
// fused ReLU backward); the GEMM chain is shared (ops/integration_mlp.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops/cpu/primitives.h"
#include "ops/integration_mlp.h"

namespace dualenc_fast::cpu {
namespace {

at::Tensor apply_dropout_cpu(const at::Tensor& p, const at::Tensor& mask, double scale) {
  const auto x = p.contiguous();
  const auto m = mask.contiguous();
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool* mp = m.const_data_ptr<bool>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(scale);
    // A dropped entry is x * 0 as in torch (NaN and Inf give NaN), except that
    // scale 0 (rate 1: everything dropped) gives exact zeros, as the reference.
    const bool zero_dropped = s == acc_t(0);
    at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t a, int64_t e) {
      for (int64_t i = a; i < e; ++i) {
        const acc_t v = static_cast<acc_t>(xp[i]);
        op[i] = static_cast<scalar_t>(mp[i] ? v * s : (zero_dropped ? acc_t(0) : v * acc_t(0)));
      }
    });
  });
  return out;
}

at::Tensor relu_cpu(const at::Tensor& hidden_pre) {
  const auto x = hidden_pre.contiguous();
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t a, int64_t e) {
      for (int64_t i = a; i < e; ++i) op[i] = xp[i] <= scalar_t(0) ? scalar_t(0) : xp[i];  // relu(NaN) = NaN, as torch
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> relu_backward_cpu(const at::Tensor& dh, const at::Tensor& hidden_pre,
                                                     const std::optional<at::Tensor>& grad_hidden_pre) {
  const auto g = dh.contiguous();
  const auto x = hidden_pre.contiguous();
  const bool extra = grad_hidden_pre.has_value() && grad_hidden_pre->defined();
  const auto gx = extra ? grad_hidden_pre->contiguous() : at::Tensor();
  auto dpre = at::empty_like(x);
  auto h = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* ep = extra ? gx.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = dpre.mutable_data_ptr<scalar_t>();
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t a, int64_t e) {
      for (int64_t i = a; i < e; ++i) {
        const bool on = !(xp[i] <= scalar_t(0));  // NaN passes its gradient, as torch
        acc_t v = on ? static_cast<acc_t>(gp[i]) : acc_t(0);
        if (ep) v += static_cast<acc_t>(ep[i]);
        dp[i] = static_cast<scalar_t>(v);
        hp[i] = on ? xp[i] : scalar_t(0);
      }
    });
  });
  return {dpre, h};
}

const MlpElementwise kCpu{&apply_dropout_cpu, &relu_cpu, &relu_backward_cpu};

std::tuple<at::Tensor, at::Tensor> integration_mlp_cpu(const at::Tensor& p,   // [B, K]
                                                       const at::Tensor& w1,  // [H, K]
                                                       const at::Tensor& b1,  // [H]
                                                       const at::Tensor& w2,  // [d, H]
                                                       const at::Tensor& b2,  // [d]
                                                       const std::optional<at::Tensor>& mask,  // [B, K] bool
                                                       double scale) {
  return integration_mlp_forward_impl(p, w1, b1, w2, b2, mask, scale, kCpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> integration_mlp_backward_cpu(
    const at::Tensor& grad_out,                         // [B, d]
    const std::optional<at::Tensor>& grad_hidden_pre,   // [B, H] or None
    const at::Tensor& p,                                // [B, K]
    const at::Tensor& hidden_pre,                       // [B, H]
    const at::Tensor& w1,                               // [H, K]
    const at::Tensor& w2,                               // [d, H]
    const std::optional<at::Tensor>& mask,              // [B, K] bool or None
    double scale) {
  return integration_mlp_backward_impl(grad_out, grad_hidden_pre, p, hidden_pre, w1, w2, mask, scale, kCpu);
}

}  // namespace
}  // namespace dualenc_fast::cpu

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("integration_mlp", &dualenc_fast::cpu::integration_mlp_cpu);
  m.impl("integration_mlp_backward", &dualenc_fast::cpu::integration_mlp_backward_cpu);
}
