// CPU kernel of sparse_weight_grads: the shared host code
// (ops/sparse_weight_grads_impl.h) on the CPU primitives plus one
// feature-major pass (weight_grads) that makes every wanted output row of a
// feature from one walk of its pair list.
#include <torch/library.h>

#include "ops/cpu/primitives.h"
#include "ops/sparse_weight_grads_impl.h"

namespace dualenc_fast::cpu {
namespace {

// Features [i0, i1) of weight_grads, C columns at a time: the C sums of each
// wanted output (dW_dec, dW_lin, dW_enc) of a column block stay in registers
// while the feature's pairs go by; each pair reads its grad_dec, grad_lin
// (top-n pairs) and x rows once. Each sum adds its terms in pair order, as
// scatter_rows does, so every row is scatter_rows' to the bit. Prefetch as in
// scatter_rows: the first line of the rows of about as many pairs ahead, and
// within a feature the next column block of each row.
template <typename scalar_t, int64_t C>
DUALENC_SIMD void weight_grads_range_blocked(const FeatureCsr& csr, const WeightGradsPtrs<scalar_t>& p,
                                             int64_t i0, int64_t i1, int64_t k, int64_t n, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t* __restrict__ rowptr = csr.rowptr.data();
  const int64_t* __restrict__ pairs = csr.pairs.data();
  const int32_t* __restrict__ rows = csr.rows.data();
  const scalar_t* __restrict__ vals = p.values;
  const scalar_t* __restrict__ gpre = p.grad_pre;
  const scalar_t* __restrict__ gd = p.grad_dec;
  const scalar_t* __restrict__ gl = p.grad_lin;
  const scalar_t* __restrict__ xe = p.xe;
  // wanted outputs (an input is nullptr when it is empty: B == 0 or d == 0)
  const bool dec = p.dW_dec != nullptr, lin = p.dW_lin != nullptr, enc = p.db_enc != nullptr;
  const int64_t qend = rowptr[i1];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t q0 = rowptr[i], q1 = rowptr[i + 1];
    const int64_t ahead = std::min(q1 + (q1 - q0) + 2, qend);
    for (int64_t q = q1; q < ahead; ++q) {
      const int64_t off = int64_t(rows[q]) * d;
      if (dec) __builtin_prefetch(gd + off);
      if (lin) __builtin_prefetch(gl + off);
      if (enc) __builtin_prefetch(xe + off);
    }
    int64_t c0 = 0;
    for (; c0 + C <= d; c0 += C) {
      acc_t ad[C] = {}, al[C] = {}, ae[C] = {};
      const bool more = c0 + C < d;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t pr = pairs[q], b = rows[q], off = b * d + c0;
        if (dec) {
          const acc_t v = static_cast<acc_t>(vals[pr]);
          const scalar_t* __restrict__ r = gd + off;
          if (more) prefetch_next_block<C>(r);
          for (int64_t c = 0; c < C; ++c) ad[c] += v * static_cast<acc_t>(r[c]);
        }
        if (lin && pr - b * k < n) {
          const acc_t v = static_cast<acc_t>(vals[pr]);
          const scalar_t* __restrict__ r = gl + off;
          if (more) prefetch_next_block<C>(r);
          for (int64_t c = 0; c < C; ++c) al[c] += v * static_cast<acc_t>(r[c]);
        }
        if (enc) {
          const acc_t z = static_cast<acc_t>(gpre[pr]);
          const scalar_t* __restrict__ r = xe + off;
          if (more) prefetch_next_block<C>(r);
          for (int64_t c = 0; c < C; ++c) ae[c] += z * static_cast<acc_t>(r[c]);
        }
      }
      if (dec) store<scalar_t, acc_t>(p.dW_dec + i * d + c0, ad, C);
      if (lin) store<scalar_t, acc_t>(p.dW_lin + i * d + c0, al, C);
      if (enc) store<scalar_t, acc_t>(p.dW_enc + i * d + c0, ae, C);
    }
    for (; c0 < d; ++c0) {  // the columns past the last whole block, as scatter_rows sums them
      acc_t ad = 0, al = 0, ae = 0;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t pr = pairs[q], b = rows[q], off = b * d + c0;
        if (dec) ad += static_cast<acc_t>(vals[pr]) * static_cast<acc_t>(gd[off]);
        if (lin && pr - b * k < n) al += static_cast<acc_t>(vals[pr]) * static_cast<acc_t>(gl[off]);
        if (enc) ae += static_cast<acc_t>(gpre[pr]) * static_cast<acc_t>(xe[off]);
      }
      if (dec) p.dW_dec[i * d + c0] = static_cast<scalar_t>(ad);
      if (lin) p.dW_lin[i * d + c0] = static_cast<scalar_t>(al);
      if (enc) p.dW_enc[i * d + c0] = static_cast<scalar_t>(ae);
    }
    if (enc) {
      acc_t total = 0;
      for (int64_t q = q0; q < q1; ++q) total += static_cast<acc_t>(gpre[pairs[q]]);
      p.db_enc[i] = static_cast<scalar_t>(total);
    }
  }
}

// Three C-column blocks of sums in registers: half the columns per block of
// scatter_rows' single one (256 bytes of sums per output, not 512).
template <typename scalar_t>
void weight_grads(const FeatureCsr& csr, const WeightGradsPtrs<scalar_t>& p, int64_t k, int64_t n, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t outputs = (p.dW_dec != nullptr) + (p.dW_lin != nullptr) + (p.db_enc != nullptr);
  at::parallel_for(0, csr.num_rows(), grain_for(d * 4 * outputs), [&](int64_t i0, int64_t i1) {
    with_column_block<acc_t, 256>([&](auto C) {
      weight_grads_range_blocked<scalar_t, decltype(C)::value>(csr, p, i0, i1, k, n, d);
    });
  });
}

struct WeightGradsPrims : Prims {
  template <typename T>
  static void weight_grads(const Csr& csr, const WeightGradsPtrs<T>& p, int64_t k, int64_t n, int64_t d) {
    cpu::weight_grads<T>(csr, p, k, n, d);
  }
};

}  // namespace
}  // namespace dualenc_fast::cpu

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("sparse_weight_grads", &dualenc_fast::sparse_weight_grads_impl<dualenc_fast::cpu::WeightGradsPrims>);
}
