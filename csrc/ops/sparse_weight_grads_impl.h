// Host-side orchestration of sparse_weight_grads shared by the CPU and CUDA
// kernels: argument checks, layout, allocation, the dense form and the dtype
// dispatch. `Prims` is a primitive set of ops/sparse_impl.h extended with
//   weight_grads<T>(csr, WeightGradsPtrs<T>, k, n, d)
// which makes the gather form's one feature-major pass over the code's
// transpose: for each feature, every wanted output row from one walk of its
// pair list (see cpu/sparse_weight_grads_cpu.cpp, cuda/sparse_weight_grads_cuda.cu).
//
// Each result is, bit for bit on the CPU, what the op it replaces gives in the
// same form: dW_dec sparse_decode_backward's dW, dW_lin the same op's on the
// code's first n columns (made contiguous), dW_enc and db_enc
// topk_encode_backward's with grad_pre = threshold_backward(grad_values,
// values, 0). The gather form sums each column pair by pair in increasing pair
// id (b * k + j), as scatter_rows does; the dense form runs the very GEMMs of
// those ops, row block by row block. sparse_form -1 resolves by the density
// of the whole code (k / F) for all four results, where a separate dW_lin op
// would resolve by n / F: pass the recorded form to get the same form.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "buffer_cache.h"
#include "ops/sparse_impl.h"
#include "ops/sparse_weight_grads.h"
#include "ops/topk_encode.h"
#include "strategy.h"

namespace dualenc_fast {

// The gather form's operands, contiguous. An output is nullptr when not
// wanted (F == 0 never reaches the kernels; dW rows are nullptr also when
// d == 0); the kernels tell what is wanted from the outputs, since an input
// may be nullptr because it is empty (B == 0).
template <typename T>
struct WeightGradsPtrs {
  const T* values;    // [B, k]
  const T* grad_pre;  // [B, k] or nullptr (with dW_enc, db_enc)
  const T* grad_dec;  // [B, d] or nullptr (with dW_dec)
  const T* grad_lin;  // [B, d] or nullptr (with dW_lin)
  const T* xe;        // [B, d] x - pre_bias, or nullptr (with dW_enc, db_enc)
  T* dW_dec;          // [F, d] or nullptr
  T* dW_lin;          // [F, d] or nullptr
  T* dW_enc;          // [F, d] or nullptr
  T* db_enc;          // [F] or nullptr
};

template <typename Prims>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_weight_grads_impl(
    const at::Tensor& indices,                  // [B, k] int64
    const at::Tensor& values,                   // [B, k]
    const std::optional<at::Tensor>& grad_pre,  // [B, k] or None
    const std::optional<at::Tensor>& grad_dec,  // [B, d] or None
    const std::optional<at::Tensor>& grad_lin,  // [B, d] or None
    const std::optional<at::Tensor>& x,         // [B, d] or None
    const std::optional<at::Tensor>& pre_bias,  // [d] or None
    int64_t num_features, int64_t n, bool check_indices,
    int64_t sparse_form) {  // recorded by the forward, or -1 (resolve_sparse_form)
  const WeightGradsArgs a = check_sparse_weight_grads_args(indices, values, grad_pre, grad_dec, grad_lin, x,
                                                           pre_bias, num_features, n, check_indices);
  const int64_t B = a.B, k = a.k, F = a.F, d = a.d;
  const auto opt = values.options();
  // the [F, d] results from the CPU buffer cache (pages faulted in once per
  // process, not once per step; the ordinary allocator on other devices)
  auto dW_dec = a.dec ? empty_cached({F, d}, opt) : at::empty({0}, opt);
  auto dW_lin = a.lin ? empty_cached({F, d}, opt) : at::empty({0}, opt);
  auto dW_enc = a.enc ? empty_cached({F, d}, opt) : at::empty({0}, opt);
  auto db_enc = a.enc ? at::empty({F}, opt) : at::empty({0}, opt);
  const bool lin_pairs = a.lin && n > 0;  // n == 0: dW_lin is zero
  if (a.lin && !lin_pairs) dW_lin.zero_();
  if (!a.dec && !lin_pairs && !a.enc) return {dW_dec, dW_lin, dW_enc, db_enc};
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto gd = a.dec ? grad_dec->contiguous() : at::Tensor();
  const auto gl = lin_pairs ? grad_lin->contiguous() : at::Tensor();
  const auto gp = a.enc ? grad_pre->contiguous() : at::Tensor();
  const auto xe = a.enc ? centered_input(*x, pre_bias) : at::Tensor();
  if (const int64_t form = resolve_sparse_form(sparse_form, v, k, F); form > 0) {
    // the GEMMs of the three ops, sharing the row blocks (dW += code^T g)
    const bool several = dense_block_rows(B, F, v, form) < B;
    const auto vn = lin_pairs ? v.narrow(1, 0, n).contiguous() : at::Tensor();    // [B, n]
    const auto in = lin_pairs ? idx.narrow(1, 0, n).contiguous() : at::Tensor();  // [B, n]
    std::optional<BlockGradSum> s_dec, s_lin, s_enc, s_b;
    if (a.dec) s_dec.emplace(dW_dec, several);
    if (lin_pairs) s_lin.emplace(dW_lin, several);
    if (a.enc) {
      s_enc.emplace(dW_enc, several);
      s_b.emplace(db_enc, several);
    }
    for_dense_blocks(B, F, v, form, [&](int64_t b0, int64_t rows) {
      const auto ib = idx.narrow(0, b0, rows);  // [rows, k]
      if (a.dec) s_dec->add_mm(scatter_code(v.narrow(0, b0, rows), ib, F).t(), gd.narrow(0, b0, rows));
      if (lin_pairs) {
        s_lin->add_mm(scatter_code(vn.narrow(0, b0, rows), in.narrow(0, b0, rows), F).t(), gl.narrow(0, b0, rows));
      }
      if (a.enc) {
        const auto gcode = scatter_code(gp.narrow(0, b0, rows), ib, F);  // [rows, F]
        s_enc->add_mm(gcode.t(), xe.narrow(0, b0, rows));
        s_b->add_column_sum(gcode);
      }
    });
    for (auto* s : {&s_dec, &s_lin, &s_enc, &s_b}) {
      if (*s) (*s)->finish();
    }
    return {dW_dec, dW_lin, dW_enc, db_enc};
  }
  if (F == 0) return {dW_dec, dW_lin, dW_enc, db_enc};  // then there are no pairs (B * k == 0)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_weight_grads", [&] {
    using T = scalar_t;
    WeightGradsPtrs<T> p{};
    p.values = v.const_data_ptr<T>();
    if (a.dec) {
      p.grad_dec = gd.const_data_ptr<T>();
      p.dW_dec = dW_dec.mutable_data_ptr<T>();
    }
    if (lin_pairs) {
      p.grad_lin = gl.const_data_ptr<T>();
      p.dW_lin = dW_lin.mutable_data_ptr<T>();
    }
    if (a.enc) {
      p.grad_pre = gp.const_data_ptr<T>();
      p.xe = xe.const_data_ptr<T>();
      p.dW_enc = dW_enc.mutable_data_ptr<T>();
      p.db_enc = db_enc.mutable_data_ptr<T>();
    }
    const auto csr_p = shared_csr<typename Prims::Csr>(indices, F, [&] { return typename Prims::Csr(idx, F); });
    Prims::template weight_grads<T>(*csr_p, p, k, n, d);
  });
  return {dW_dec, dW_lin, dW_enc, db_enc};
}

}  // namespace dualenc_fast
