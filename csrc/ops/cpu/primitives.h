// The three CPU primitives every op is built from (see KERNELS.md):
//   gather_sum   out[b]  = bias + sum_j coef[b, j] * W[idx[b, j]]
//   row_dot      dv[b,j] = <g[b], W[idx[b, j]]>
//   FeatureCsr + scatter_rows
//                dW[i]   = sum over (b, j) with idx[b, j] == i of coef[b, j] * y[b]
// All pointers are to contiguous row-major buffers; accumulation is in
// at::opmath_type<scalar_t> (float for half/bfloat16/float, double for double).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dualenc_fast::cpu {

// Rows per parallel task so that each task does roughly `work` multiply-adds.
inline int64_t grain_for(int64_t per_row, int64_t work = 1 << 15) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, per_row));
}

template <typename scalar_t>
void gather_sum(const scalar_t* coef,   // [B, k]
                const int64_t* idx,     // [B, k]
                const scalar_t* W,      // [F, d]
                const scalar_t* bias,   // [d] or nullptr
                scalar_t* out,          // [B, d]
                int64_t B, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, grain_for(k * d), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> acc(d);
    for (int64_t b = b0; b < b1; ++b) {
      if (bias) {
        for (int64_t c = 0; c < d; ++c) acc[c] = static_cast<acc_t>(bias[c]);
      } else {
        std::fill(acc.begin(), acc.end(), acc_t(0));
      }
      for (int64_t j = 0; j < k; ++j) {
        const acc_t v = static_cast<acc_t>(coef[b * k + j]);
        const scalar_t* w = W + idx[b * k + j] * d;
        acc_t* a = acc.data();
        for (int64_t c = 0; c < d; ++c) a[c] += v * static_cast<acc_t>(w[c]);
      }
      scalar_t* o = out + b * d;
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

template <typename scalar_t>
void row_dot(const scalar_t* g,     // [B, d]
             const int64_t* idx,    // [B, k]
             const scalar_t* W,     // [F, d]
             scalar_t* out,         // [B, k]
             int64_t B, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, grain_for(k * d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* gb = g + b * d;
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* w = W + idx[b * k + j] * d;
        acc_t s = 0;
        for (int64_t c = 0; c < d; ++c) s += static_cast<acc_t>(gb[c]) * static_cast<acc_t>(w[c]);
        out[b * k + j] = static_cast<scalar_t>(s);
      }
    }
  });
}

// The transpose of a sparse code: for each feature, the flat pair ids
// p = b * k + j with idx[p] == feature, in increasing p (a counting sort, so
// every reduction over it is deterministic).
struct FeatureCsr {
  std::vector<int64_t> rowptr;  // [F + 1]
  std::vector<int64_t> pairs;   // [B * k]

  FeatureCsr(const int64_t* idx, int64_t n_pairs, int64_t F) : rowptr(F + 1, 0), pairs(n_pairs) {
    for (int64_t p = 0; p < n_pairs; ++p) ++rowptr[idx[p] + 1];
    for (int64_t i = 0; i < F; ++i) rowptr[i + 1] += rowptr[i];
    std::vector<int64_t> fill(rowptr.begin(), rowptr.end() - 1);
    for (int64_t p = 0; p < n_pairs; ++p) pairs[fill[idx[p]]++] = p;
  }
  int64_t num_rows() const { return static_cast<int64_t>(rowptr.size()) - 1; }
};

// dW[i] = sum_{p in csr[i]} coef[p] * y[p / k]; optionally dsum[i] = sum coef[p].
// Writes every row of dW (zeros for features no pair selected).
template <typename scalar_t>
void scatter_rows(const FeatureCsr& csr,
                  const scalar_t* coef,  // [B, k]
                  const scalar_t* y,     // [B, d]
                  scalar_t* dW,          // [F, d]
                  scalar_t* dsum,        // [F] or nullptr
                  int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = csr.num_rows();
  at::parallel_for(0, F, grain_for(d * 4), [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> acc(d);
    for (int64_t i = i0; i < i1; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t total = 0;
      for (int64_t q = csr.rowptr[i]; q < csr.rowptr[i + 1]; ++q) {
        const int64_t p = csr.pairs[q];
        const acc_t v = static_cast<acc_t>(coef[p]);
        total += v;
        const scalar_t* yb = y + (p / k) * d;
        acc_t* a = acc.data();
        for (int64_t c = 0; c < d; ++c) a[c] += v * static_cast<acc_t>(yb[c]);
      }
      scalar_t* o = dW + i * d;
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      if (dsum) dsum[i] = static_cast<scalar_t>(total);
    }
  });
}

}  // namespace dualenc_fast::cpu
