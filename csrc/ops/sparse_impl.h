// Host-side orchestration shared by the CPU and CUDA kernels of the sparse
// ops: argument checks, layout, allocation and dtype dispatch. `Prims` supplies
// the device primitives (cpu::Prims in cpu/primitives.h, cuda::Prims in
// cuda/primitives.cuh):
//   gather_sum<T>(coef, idx, W, bias, out, B, k, d)   out[b] = bias + sum_j coef[b,j] W[idx[b,j]]
//   row_dot<T>(g, idx, W, out, B, k, d)               out[b,j] = <g[b], W[idx[b,j]]>
//   Csr(idx tensor, F)                                the code's transpose, grouped by feature
//   scatter_rows<T>(csr, coef, y, dW, dsum, F, k, d)  dW[i] = sum_{idx=i} coef * y[b]
// Each product also has a dense form (a GEMM on the code scattered into
// [rows, F] blocks, ATen ops only, so the same code runs on every device);
// use_dense_path (strategy.h) picks one by the code's density; a backward
// takes the form its forward recorded (`sparse_form`, resolve_sparse_form).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "csr_share.h"
#include "ops/sparse_decode.h"
#include "ops/topk_encode.h"
#include "strategy.h"

namespace dualenc_fast {

// ---------------------------------------------------------------- dense path
// Whether a primitive set has staged_scatter_rows (CUDA only, staged_rows.cuh).
template <typename P, typename = void>
struct has_staged_rows : std::false_type {};
template <typename P>
struct has_staged_rows<P, std::void_t<decltype(&P::template staged_scatter_rows<float>)>> : std::true_type {};

// Whether the dense form's weight gradients go through staged_scatter_rows
// instead of the GEMMs (ops.set_dense_weight_grads; CUDA and its emulation
// only: the CPU primitives have no staged_scatter_rows and keep the GEMMs).
template <typename Prims>
bool dense_weight_grads_staged() {
  return has_staged_rows<Prims>::value && sparse_strategy().dense_wgrad_staged;
}

// dW[i] = sum over the pairs of feature i of coef * y[b] (dsum[i] = sum of
// coef) through the code's shared transpose and staged_scatter_rows.
template <typename Prims>
void staged_weight_grads(const at::Tensor& indices, const at::Tensor& idx, const at::Tensor& coef,
                         const at::Tensor& y, at::Tensor& dW, at::Tensor* dsum, int64_t F, int64_t k, int64_t d) {
  if constexpr (has_staged_rows<Prims>::value) {
    const auto csr_p = shared_csr<typename Prims::Csr>(indices, F, [&] { return typename Prims::Csr(idx, F); });
    const int64_t smem = sparse_strategy().staged_smem_bytes;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coef.scalar_type(), "staged_weight_grads", [&] {
      Prims::template staged_scatter_rows<scalar_t>(*csr_p, coef.const_data_ptr<scalar_t>(),
                                                    y.const_data_ptr<scalar_t>(), dW.mutable_data_ptr<scalar_t>(),
                                                    dsum ? dsum->mutable_data_ptr<scalar_t>() : nullptr, F, k, d,
                                                    smem);
    });
  }
}

// Rows per dense block: a dense [rows, F] block (and, in backward, its
// gradient) stays near `block_bytes` (at least one row).
inline int64_t dense_block_rows(int64_t B, int64_t F, const at::Tensor& like, int64_t block_bytes) {
  const int64_t per_row = std::max<int64_t>(1, F * static_cast<int64_t>(like.element_size()));
  return std::max<int64_t>(1, std::min<int64_t>(B, block_bytes / per_row));
}

// Calls fn(b0, rows) over consecutive row blocks of the batch of
// dense_block_rows rows each.
template <typename Fn>
void for_dense_blocks(int64_t B, int64_t F, const at::Tensor& like, int64_t block_bytes, Fn&& fn) {
  const int64_t rows = dense_block_rows(B, F, like, block_bytes);
  for (int64_t b0 = 0; b0 < B; b0 += rows) fn(b0, std::min(rows, B - b0));
}

// A gradient summed over the row blocks of the dense form, written into `out`
// by finish(). A 16-bit gradient over several blocks is summed in float32 and
// rounded once at the end, never once per block into a 16-bit running sum.
class BlockGradSum {
 public:
  BlockGradSum(at::Tensor out, bool several_blocks)
      : out_(std::move(out)),
        widen_(several_blocks && (out_.scalar_type() == at::kHalf || out_.scalar_type() == at::kBFloat16)) {
    acc_ = widen_ ? at::zeros(out_.sizes(), out_.options().dtype(at::kFloat)) : out_.zero_();
  }
  void add_mm(const at::Tensor& a, const at::Tensor& b) {  // += a @ b
    if (widen_) {
      acc_.add_(at::mm(a, b));  // the GEMM accumulates in float32 and rounds once per block
    } else {
      acc_.addmm_(a, b);
    }
  }
  void add_column_sum(const at::Tensor& a) { acc_.add_(at::sum(a, 0, false, acc_.scalar_type())); }
  void finish() {
    if (widen_) out_.copy_(acc_);
  }

 private:
  at::Tensor out_, acc_;
  bool widen_;
};

// code[r, idx[r, j]] += v[r, j]: the sparse code of some rows as a dense
// [rows, F] tensor (repeated indices add up).
inline at::Tensor scatter_code(const at::Tensor& v, const at::Tensor& idx, int64_t F) {
  return at::zeros({v.size(0), F}, v.options()).scatter_add_(1, idx, v);
}

template <typename Prims>
at::Tensor sparse_decode_impl(const at::Tensor& values,   // [B, k]
                              const at::Tensor& indices,  // [B, k] int64
                              const at::Tensor& weight,   // [F, d]
                              const std::optional<at::Tensor>& bias,  // [d] or None
                              bool check_indices) {
  check_sparse_decode_args(values, indices, weight, bias, check_indices);
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  auto out = at::empty({B, d}, v.options());
  if (const int64_t form = resolve_sparse_form(-1, v, k, F); form > 0) {
    for_dense_blocks(B, F, v, form, [&](int64_t b0, int64_t n) {
      const auto code = scatter_code(v.narrow(0, b0, n), idx.narrow(0, b0, n), F);  // [n, F]
      auto o = out.narrow(0, b0, n);
      if (has_bias) {
        at::addmm_out(o, b, code, W);
      } else {
        at::mm_out(o, code, W);
      }
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode", [&] {
    Prims::template gather_sum<scalar_t>(v.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                         W.const_data_ptr<scalar_t>(),
                                         has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                         out.mutable_data_ptr<scalar_t>(), B, k, d);
  });
  return out;
}

template <typename Prims>
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_impl(
    const at::Tensor& grad_out,  // [B, d]
    const at::Tensor& values,    // [B, k]
    const at::Tensor& indices,   // [B, k] int64
    const at::Tensor& weight,    // [F, d]
    bool need_values_grad, bool need_weight_grad, bool check_indices,
    int64_t sparse_form) {  // recorded by the forward, or -1 (resolve_sparse_form)
  check_sparse_decode_backward_args(grad_out, values, indices, weight, check_indices);
  const auto g = grad_out.contiguous();
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  auto grad_values = need_values_grad ? at::empty({B, k}, v.options()) : at::empty({0}, v.options());
  auto grad_weight = need_weight_grad ? at::empty({F, d}, W.options()) : at::empty({0}, W.options());
  if (const int64_t form = resolve_sparse_form(sparse_form, v, k, F); form > 0) {
    // dv[b, j] = (g W^T)[b, idx[b, j]], in feature chunks read back through the
    // code's transpose (dense_dv_chunk), else per row block below
    const int64_t chunk = need_values_grad && B > 0 ? dense_dv_chunk(B, F, v.element_size(), form) : 0;
    if (chunk > 0) {
      const auto csr_p = shared_csr<typename Prims::Csr>(indices, F, [&] { return typename Prims::Csr(idx, F); });
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode_backward", [&] {
        for (int64_t f0 = 0; f0 < F; f0 += chunk) {
          const int64_t n = std::min(chunk, F - f0);
          const auto prod = at::mm(g, W.narrow(0, f0, n).t());  // [B, n]
          Prims::template gather_transposed<scalar_t>(*csr_p, prod.const_data_ptr<scalar_t>(), f0, n,
                                                      grad_values.mutable_data_ptr<scalar_t>());
        }
      });
    }
    const bool several = dense_block_rows(B, F, v, form) < B;
    const bool staged = need_weight_grad && dense_weight_grads_staged<Prims>();
    if (staged) staged_weight_grads<Prims>(indices, idx, v, g, grad_weight, nullptr, F, k, d);
    std::optional<BlockGradSum> dW;
    if (need_weight_grad && !staged) dW.emplace(grad_weight, several);
    if ((need_values_grad && chunk == 0) || dW) for_dense_blocks(B, F, v, form, [&](int64_t b0, int64_t n) {
      const auto gb = g.narrow(0, b0, n);      // [n, d]
      const auto ib = idx.narrow(0, b0, n);    // [n, k]
      if (need_values_grad && chunk == 0) {    // dv[b, j] = (g W^T)[b, idx[b, j]]
        auto gv = grad_values.narrow(0, b0, n);
        at::gather_out(gv, at::mm(gb, W.t()), 1, ib);
      }
      if (dW) dW->add_mm(scatter_code(v.narrow(0, b0, n), ib, F).t(), gb);  // dW += code^T g
    });
    if (dW) dW->finish();
    return {grad_values, grad_weight};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_decode_backward", [&] {
    if (need_values_grad) {
      Prims::template row_dot<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                        W.const_data_ptr<scalar_t>(),
                                        grad_values.mutable_data_ptr<scalar_t>(), B, k, d);
    }
    if (need_weight_grad) {
      const auto csr_p = shared_csr<typename Prims::Csr>(indices, F, [&] { return typename Prims::Csr(idx, F); });
      const auto& csr = *csr_p;
      Prims::template scatter_rows<scalar_t>(csr, v.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                             grad_weight.mutable_data_ptr<scalar_t>(), nullptr, F, k, d);
    }
  });
  return {grad_values, grad_weight};
}

template <typename Prims>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_impl(
    const at::Tensor& grad_values,  // [B, k]
    const at::Tensor& values,       // [B, k]
    const at::Tensor& indices,      // [B, k] int64
    const at::Tensor& x,            // [B, d]
    const at::Tensor& weight,       // [F, d]
    const std::optional<at::Tensor>& pre_bias,  // [d] or None
    bool need_x_grad, bool need_weight_grad, bool check_indices,
    int64_t sparse_form) {  // recorded by the forward, or -1 (resolve_sparse_form)
  check_topk_encode_backward_args(grad_values, values, indices, x, weight, pre_bias, check_indices);
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  // a selected value that ReLU clamped to zero passes no gradient (a NaN
  // passes it, as torch's relu backward)
  const auto g = at::threshold_backward(grad_values, v, 0).contiguous();
  auto grad_x = need_x_grad ? at::empty({B, d}, v.options()) : at::empty({0}, v.options());
  auto grad_w = need_weight_grad ? at::empty({F, d}, v.options()) : at::empty({0}, v.options());
  auto grad_b = need_weight_grad ? at::empty({F}, v.options()) : at::empty({0}, v.options());
  if (const int64_t form = resolve_sparse_form(sparse_form, v, k, F); form > 0) {
    const auto xe = need_weight_grad ? centered_input(x, pre_bias) : at::Tensor();
    const bool several = dense_block_rows(B, F, v, form) < B;
    const bool staged = need_weight_grad && dense_weight_grads_staged<Prims>();
    if (staged) staged_weight_grads<Prims>(indices, idx, g, xe, grad_w, &grad_b, F, k, d);
    std::optional<BlockGradSum> dW, db;
    if (need_weight_grad && !staged) {
      dW.emplace(grad_w, several);
      db.emplace(grad_b, several);
    }
    if (need_x_grad || dW) for_dense_blocks(B, F, v, form, [&](int64_t b0, int64_t n) {
      const auto gcode = scatter_code(g.narrow(0, b0, n), idx.narrow(0, b0, n), F);  // [n, F]
      if (need_x_grad) {
        auto gx = grad_x.narrow(0, b0, n);
        at::mm_out(gx, gcode, W);
      }
      if (dW) {
        dW->add_mm(gcode.t(), xe.narrow(0, b0, n));
        db->add_column_sum(gcode);
      }
    });
    if (dW) {
      dW->finish();
      db->finish();
    }
    return {grad_x, grad_w, grad_b};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "topk_encode_backward", [&] {
    if (need_x_grad) {
      Prims::template gather_sum<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                           W.const_data_ptr<scalar_t>(), nullptr,
                                           grad_x.mutable_data_ptr<scalar_t>(), B, k, d);
    }
    if (need_weight_grad) {
      const auto xe = centered_input(x, pre_bias);
      const auto csr_p = shared_csr<typename Prims::Csr>(indices, F, [&] { return typename Prims::Csr(idx, F); });
      const auto& csr = *csr_p;
      Prims::template scatter_rows<scalar_t>(csr, g.const_data_ptr<scalar_t>(), xe.const_data_ptr<scalar_t>(),
                                             grad_w.mutable_data_ptr<scalar_t>(),
                                             grad_b.mutable_data_ptr<scalar_t>(), F, k, d);
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace dualenc_fast
