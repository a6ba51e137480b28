// CPU kernels of fm_interaction: one pass over each row's active embeddings
// (two K-wide accumulators), and a backward that recomputes s per row and
// reduces dE grouped by feature (no atomics, deterministic).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "ops/cpu/primitives.h"
#include "ops/fm_interaction.h"

namespace dualenc_fast::cpu {
namespace {

template <typename scalar_t>
DUALENC_SIMD void fm_forward_rows(const scalar_t* vp, const int64_t* ip, const scalar_t* Ep, scalar_t* op,
                                  int64_t b0, int64_t b1, int64_t k, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> sbuf(K), qbuf(K);
  acc_t* __restrict__ s = sbuf.data();
  acc_t* __restrict__ q = qbuf.data();
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t c = 0; c < K; ++c) s[c] = q[c] = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t ahead = b * k + j + kPrefetchDistance;
      if (ahead < b1 * k) prefetch_row(Ep + ip[ahead] * K, K);
      const acc_t vj = static_cast<acc_t>(vp[b * k + j]);
      const scalar_t* __restrict__ e = Ep + ip[b * k + j] * K;
      for (int64_t c = 0; c < K; ++c) {
        const acc_t t = vj * static_cast<acc_t>(e[c]);
        s[c] += t;
        q[c] += t * t;
      }
    }
    for (int64_t c = 0; c < K; ++c) op[b * K + c] = static_cast<scalar_t>(acc_t(0.5) * (s[c] * s[c] - q[c]));
  }
}

// Per row: s = sum_j v_j E[i_j] into S, then dv_j = <g, E[i_j] * (s - v_j E[i_j])>.
template <typename scalar_t, typename acc_t>
DUALENC_SIMD void fm_backward_rows(const scalar_t* gp, const scalar_t* vp, const int64_t* ip,
                                   const scalar_t* Ep, acc_t* S, scalar_t* dv, int64_t b0, int64_t b1,
                                   int64_t k, int64_t K) {
  std::vector<acc_t> gbuf(K);
  acc_t* __restrict__ gb = gbuf.data();
  for (int64_t b = b0; b < b1; ++b) {
    acc_t* __restrict__ s = S + b * K;
    for (int64_t c = 0; c < K; ++c) s[c] = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t ahead = b * k + j + kPrefetchDistance;
      if (ahead < b1 * k) prefetch_row(Ep + ip[ahead] * K, K);
      axpy<scalar_t, acc_t>(s, static_cast<acc_t>(vp[b * k + j]), Ep + ip[b * k + j] * K, K);
    }
    if (!dv) continue;
    for (int64_t c = 0; c < K; ++c) gb[c] = static_cast<acc_t>(gp[b * K + c]);
    for (int64_t j = 0; j < k; ++j) {
      const acc_t vj = static_cast<acc_t>(vp[b * k + j]);
      const scalar_t* __restrict__ e = Ep + ip[b * k + j] * K;
      // <g, e * s> - v_j <g, e * e>, with independent partial sums
      constexpr int L = 8;
      acc_t part[L] = {};
      int64_t c = 0;
      for (; c + L <= K; c += L) {
        for (int l = 0; l < L; ++l) {
          const acc_t ec = static_cast<acc_t>(e[c + l]);
          part[l] += gb[c + l] * ec * (s[c + l] - vj * ec);
        }
      }
      acc_t acc = 0;
      for (; c < K; ++c) {
        const acc_t ec = static_cast<acc_t>(e[c]);
        acc += gb[c] * ec * (s[c] - vj * ec);
      }
      for (int l = 0; l < L; ++l) acc += part[l];
      dv[b * k + j] = static_cast<scalar_t>(acc);
    }
  }
}

// dE[i] = sum over the pairs of feature i of v * g[b] * (S[b] - v * E[i]),
// C columns at a time: the C sums of a column block stay in registers while
// the feature's pairs go by (each sum adds its terms in pair order). While a
// feature is worked on, the first lines of the g and S rows of about as many
// pairs ahead are asked for.
template <typename scalar_t, typename acc_t, int64_t C>
DUALENC_SIMD void fm_backward_features_blocked(const FeatureCsr& csr, const scalar_t* gp, const scalar_t* vp,
                                               const scalar_t* Ep, const acc_t* S, scalar_t* dE, int64_t i0,
                                               int64_t i1, int64_t K) {
  const int64_t* __restrict__ rowptr = csr.rowptr.data();
  const int64_t* __restrict__ pairs = csr.pairs.data();
  const int32_t* __restrict__ rows = csr.rows.data();
  const int64_t qend = rowptr[i1];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t q0 = rowptr[i], q1 = rowptr[i + 1];
    const int64_t ahead = std::min(q1 + (q1 - q0) + 2, qend);
    for (int64_t q = q1; q < ahead; ++q) {
      __builtin_prefetch(gp + int64_t(rows[q]) * K);
      __builtin_prefetch(S + int64_t(rows[q]) * K);
    }
    const scalar_t* __restrict__ e = Ep + i * K;
    scalar_t* __restrict__ out = dE + i * K;
    int64_t c0 = 0;
    for (; c0 + C <= K; c0 += C) {
      acc_t a[C] = {};
      for (int64_t q = q0; q < q1; ++q) {
        const acc_t vj = static_cast<acc_t>(vp[pairs[q]]);
        const int64_t b = rows[q];
        const scalar_t* __restrict__ gb = gp + b * K + c0;
        const acc_t* __restrict__ s = S + b * K + c0;
        for (int64_t c = 0; c < C; ++c) {
          a[c] += vj * static_cast<acc_t>(gb[c]) * (s[c] - vj * static_cast<acc_t>(e[c0 + c]));
        }
      }
      store<scalar_t, acc_t>(out + c0, a, C);
    }
    for (; c0 < K; ++c0) {
      acc_t a = 0;
      for (int64_t q = q0; q < q1; ++q) {
        const acc_t vj = static_cast<acc_t>(vp[pairs[q]]);
        const int64_t b = rows[q];
        a += vj * static_cast<acc_t>(gp[b * K + c0]) * (S[b * K + c0] - vj * static_cast<acc_t>(e[c0]));
      }
      out[c0] = static_cast<scalar_t>(a);
    }
  }
}

template <typename scalar_t, typename acc_t>
void fm_backward_features(const FeatureCsr& csr, const scalar_t* gp, const scalar_t* vp, const scalar_t* Ep,
                          const acc_t* S, scalar_t* dE, int64_t i0, int64_t i1, int64_t K) {
  constexpr int64_t kWide = 512 / static_cast<int64_t>(sizeof(acc_t));
  if (wide_vectors()) {
    fm_backward_features_blocked<scalar_t, acc_t, kWide>(csr, gp, vp, Ep, S, dE, i0, i1, K);
  } else {
    fm_backward_features_blocked<scalar_t, acc_t, kWide / 2>(csr, gp, vp, Ep, S, dE, i0, i1, K);
  }
}

at::Tensor fm_interaction_cpu(const at::Tensor& values,      // [B, k]
                              const at::Tensor& indices,     // [B, k] int64
                              const at::Tensor& embeddings,  // [F, K]
                              bool check_indices) {
  auto a = prepare_fm_interaction(values, indices, embeddings, check_indices);
  const at::Tensor &v = a.v, &idx = a.idx, &E = a.E;
  at::Tensor& out = a.out;
  const int64_t B = a.B, k = a.k, K = a.K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fm_interaction_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t* Ep = E.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(k * K), [&](int64_t b0, int64_t b1) {
      fm_forward_rows<scalar_t>(vp, ip, Ep, op, b0, b1, k, K);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fm_interaction_backward_cpu(
    const at::Tensor& grad_p,      // [B, K]
    const at::Tensor& values,      // [B, k]
    const at::Tensor& indices,     // [B, k] int64
    const at::Tensor& embeddings,  // [F, K]
    bool need_values_grad, bool need_embeddings_grad, bool check_indices) {
  auto a = prepare_fm_interaction_backward(grad_p, values, indices, embeddings, need_values_grad,
                                           need_embeddings_grad, check_indices);
  const at::Tensor &g = a.g, &v = a.v, &idx = a.idx, &E = a.E;
  at::Tensor &grad_v = a.grad_v, &grad_E = a.grad_E;
  const int64_t B = a.B, k = a.k, F = a.F, K = a.K;
  if (!need_values_grad && !need_embeddings_grad) return {grad_v, grad_E};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fm_interaction_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t* Ep = E.const_data_ptr<scalar_t>();
    // s per row, kept for the grouped dE pass
    std::vector<acc_t> S(static_cast<size_t>(B * K));
    scalar_t* dv = need_values_grad ? grad_v.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, grain_for(k * K), [&](int64_t b0, int64_t b1) {
      fm_backward_rows<scalar_t, acc_t>(gp, vp, ip, Ep, S.data(), dv, b0, b1, k, K);
    });
    if (need_embeddings_grad) {
      const FeatureCsr csr(ip, B * k, F, k);
      scalar_t* dE = grad_E.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, F, grain_for(K * 4), [&](int64_t i0, int64_t i1) {
        fm_backward_features<scalar_t, acc_t>(csr, gp, vp, Ep, S.data(), dE, i0, i1, K);
      });
    }
  });
  return {grad_v, grad_E};
}

}  // namespace
}  // namespace dualenc_fast::cpu

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("fm_interaction", &dualenc_fast::cpu::fm_interaction_cpu);
  m.impl("fm_interaction_backward", &dualenc_fast::cpu::fm_interaction_backward_cpu);
}
