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
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace dualenc_fast::cpu {

// Hot loops are compiled three times, for x86-64-v4 (AVX-512), x86-64-v3
// (AVX2 + FMA) and the baseline, and the loader picks the best one the running
// CPU supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define DUALENC_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DUALENC_SIMD
#endif

// How many gathered rows ahead to prefetch.
constexpr int64_t kPrefetchDistance = 16;

// Rows per parallel task so that each task does roughly `work` multiply-adds.
inline int64_t grain_for(int64_t per_row, int64_t work = 1 << 15) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, per_row));
}

// acc[0..n) += v * w[0..n)
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict__ acc, acc_t v, const scalar_t* __restrict__ w, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += v * static_cast<acc_t>(w[c]);
}

// <a, b> with independent partial sums, so the loop vectorises.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  constexpr int L = 16;
  acc_t part[L] = {};
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    for (int l = 0; l < L; ++l) part[l] += static_cast<acc_t>(a[c + l]) * static_cast<acc_t>(b[c + l]);
  }
  acc_t s = 0;
  for (; c < n; ++c) s += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  for (int l = 0; l < L; ++l) s += part[l];
  return s;
}

// Ask for a row that will be read soon (random weight rows defeat the
// hardware prefetcher at their start).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* __restrict__ out, const acc_t* __restrict__ acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(acc[c]);
}

// Whether the running CPU has 512-bit vectors (32 vector registers): the
// register-blocked loops then keep twice the columns in registers.
// DUALENC_CPU_NARROW=1 in the environment (read once) takes the narrow blocks
// anyway, so that the tests cover both on any machine.
inline bool wide_vectors() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
  static const bool wide = [] {
    const char* narrow = std::getenv("DUALENC_CPU_NARROW");
    return __builtin_cpu_supports("avx512f") && !(narrow && narrow[0] == '1');
  }();
  return wide;
#else
  return false;
#endif
}

// Calls fn(std::integral_constant<int64_t, C>{}) with C the number of acc_t
// sums a register-blocked loop keeps per column block: `bytes` of them with
// 512-bit vectors, half as many otherwise.
template <typename acc_t, int64_t bytes = 512, typename Fn>
inline void with_column_block(Fn&& fn) {
  constexpr int64_t kWide = bytes / static_cast<int64_t>(sizeof(acc_t));
  if (wide_vectors()) {
    fn(std::integral_constant<int64_t, kWide>{});
  } else {
    fn(std::integral_constant<int64_t, kWide / 2>{});
  }
}

// While one column block of a row is summed, ask for the next one (its first
// two cache lines; the hardware prefetcher streams the rest).
template <int64_t C, typename T>
inline void prefetch_next_block(const T* block) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  __builtin_prefetch(block + C);
  __builtin_prefetch(block + C + kLine);
}

// Rows [b0, b1) of gather_sum, C columns at a time: the C sums of a column
// block stay in registers while the row's k weight rows go by (no accumulator
// in memory), and each sum adds its terms in code order, as a plain loop would.
// While a row is worked on, the first line of each weight row of the next row
// is asked for; within a row, the next column block of each weight row.
template <typename scalar_t, int64_t C>
DUALENC_SIMD void gather_sum_rows_blocked(const scalar_t* coef, const int64_t* idx, const scalar_t* W,
                                          const scalar_t* bias, scalar_t* out, int64_t b0, int64_t b1,
                                          int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t* __restrict__ ib = idx + b * k;
    const scalar_t* __restrict__ cb = coef + b * k;
    if (b + 1 < b1) {
      for (int64_t j = 0; j < k; ++j) __builtin_prefetch(W + ib[k + j] * d);
    }
    int64_t c0 = 0;
    for (; c0 + C <= d; c0 += C) {
      acc_t a[C];
      for (int64_t c = 0; c < C; ++c) a[c] = bias ? static_cast<acc_t>(bias[c0 + c]) : acc_t(0);
      const bool more = c0 + C < d;
      for (int64_t j = 0; j < k; ++j) {
        const acc_t v = static_cast<acc_t>(cb[j]);
        const scalar_t* __restrict__ w = W + ib[j] * d + c0;
        if (more) prefetch_next_block<C>(w);
        for (int64_t c = 0; c < C; ++c) a[c] += v * static_cast<acc_t>(w[c]);
      }
      store<scalar_t, acc_t>(out + b * d + c0, a, C);
    }
    for (; c0 < d; ++c0) {
      acc_t a = bias ? static_cast<acc_t>(bias[c0]) : acc_t(0);
      for (int64_t j = 0; j < k; ++j) a += static_cast<acc_t>(cb[j]) * static_cast<acc_t>(W[ib[j] * d + c0]);
      out[b * d + c0] = static_cast<scalar_t>(a);
    }
  }
}

template <typename scalar_t>
void gather_sum_rows(const scalar_t* coef, const int64_t* idx, const scalar_t* W, const scalar_t* bias,
                     scalar_t* out, int64_t b0, int64_t b1, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  with_column_block<acc_t>([&](auto C) {
    gather_sum_rows_blocked<scalar_t, decltype(C)::value>(coef, idx, W, bias, out, b0, b1, k, d);
  });
}

template <typename scalar_t>
void gather_sum(const scalar_t* coef,   // [B, k]
                const int64_t* idx,     // [B, k]
                const scalar_t* W,      // [F, d]
                const scalar_t* bias,   // [d] or nullptr
                scalar_t* out,          // [B, d]
                int64_t B, int64_t k, int64_t d) {
  at::parallel_for(0, B, grain_for(k * d), [&](int64_t b0, int64_t b1) {
    gather_sum_rows<scalar_t>(coef, idx, W, bias, out, b0, b1, k, d);
  });
}

template <typename scalar_t>
DUALENC_SIMD void row_dot_rows(const scalar_t* g, const int64_t* idx, const scalar_t* W, scalar_t* out,
                               int64_t b0, int64_t b1, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t ahead = b * k + j + kPrefetchDistance;
      if (ahead < b1 * k) prefetch_row(W + idx[ahead] * d, d);
      out[b * k + j] = static_cast<scalar_t>(dot<scalar_t, acc_t>(g + b * d, W + idx[b * k + j] * d, d));
    }
  }
}

template <typename scalar_t>
void row_dot(const scalar_t* g,     // [B, d]
             const int64_t* idx,    // [B, k]
             const scalar_t* W,     // [F, d]
             scalar_t* out,         // [B, k]
             int64_t B, int64_t k, int64_t d) {
  at::parallel_for(0, B, grain_for(k * d), [&](int64_t b0, int64_t b1) {
    row_dot_rows<scalar_t>(g, idx, W, out, b0, b1, k, d);
  });
}

// The transpose of a sparse code: for each feature, the flat pair ids
// p = b * k + j with idx[p] == feature, in increasing p (a counting sort, so
// every reduction over it is deterministic), and beside each its batch row b
// (int32), so the passes over it never divide.
struct FeatureCsr {
  std::vector<int64_t> rowptr;  // [F + 1]
  std::vector<int64_t> pairs;   // [B * k]
  std::vector<int32_t> rows;    // [B * k]: pairs[q] / k

  FeatureCsr(const at::Tensor& idx, int64_t F)  // idx [B, k] contiguous int64
      : FeatureCsr(idx.const_data_ptr<int64_t>(), idx.numel(), F, idx.size(-1)) {
    TORCH_CHECK(idx.dim() == 2, "FeatureCsr: indices must be [B, k], got ", idx.dim(), " dimensions");
  }
  FeatureCsr(const int64_t* idx, int64_t n_pairs, int64_t F, int64_t k)
      : rowptr(F + 1, 0), pairs(n_pairs), rows(n_pairs) {
    TORCH_CHECK(n_pairs == 0 || (k > 0 && n_pairs % k == 0), "FeatureCsr: ", n_pairs,
                " pairs are not whole rows of k = ", k);
    TORCH_CHECK(n_pairs == 0 || n_pairs / k <= (int64_t(1) << 31), "FeatureCsr: more than 2^31 batch rows");
    for (int64_t p = 0; p < n_pairs; ++p) ++rowptr[idx[p] + 1];
    for (int64_t i = 0; i < F; ++i) rowptr[i + 1] += rowptr[i];
    std::vector<int64_t> fill(rowptr.begin(), rowptr.end() - 1);
    for (int64_t p = 0, b = 0; p < n_pairs; b++) {
      for (int64_t j = 0; j < k; ++j, ++p) {
        const int64_t q = fill[idx[p]]++;
        pairs[q] = p;
        rows[q] = static_cast<int32_t>(b);
      }
    }
  }
  int64_t num_rows() const { return static_cast<int64_t>(rowptr.size()) - 1; }
  static bool shareable_now() { return true; }  // csr_share.h
};

// Features [i0, i1) of scatter_rows, C columns at a time: the C sums of a
// column block stay in registers while the feature's pairs go by, each sum
// adding its terms in pair order. While a feature is worked on, the first line
// of the batch rows of about as many pairs ahead is asked for; within a
// feature, the next column block of each batch row.
template <typename scalar_t, int64_t C>
DUALENC_SIMD void scatter_rows_range_blocked(const FeatureCsr& csr, const scalar_t* coef, const scalar_t* y,
                                             scalar_t* dW, scalar_t* dsum, int64_t i0, int64_t i1, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t* __restrict__ rowptr = csr.rowptr.data();
  const int64_t* __restrict__ pairs = csr.pairs.data();
  const int32_t* __restrict__ rows = csr.rows.data();
  const int64_t qend = rowptr[i1];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t q0 = rowptr[i], q1 = rowptr[i + 1];
    const int64_t ahead = std::min(q1 + (q1 - q0) + 2, qend);
    for (int64_t q = q1; q < ahead; ++q) __builtin_prefetch(y + int64_t(rows[q]) * d);
    scalar_t* __restrict__ out = dW + i * d;
    int64_t c0 = 0;
    for (; c0 + C <= d; c0 += C) {
      acc_t a[C] = {};
      const bool more = c0 + C < d;
      for (int64_t q = q0; q < q1; ++q) {
        const acc_t v = static_cast<acc_t>(coef[pairs[q]]);
        const scalar_t* __restrict__ yr = y + int64_t(rows[q]) * d + c0;
        if (more) prefetch_next_block<C>(yr);
        for (int64_t c = 0; c < C; ++c) a[c] += v * static_cast<acc_t>(yr[c]);
      }
      store<scalar_t, acc_t>(out + c0, a, C);
    }
    for (; c0 < d; ++c0) {
      acc_t a = 0;
      for (int64_t q = q0; q < q1; ++q) {
        a += static_cast<acc_t>(coef[pairs[q]]) * static_cast<acc_t>(y[int64_t(rows[q]) * d + c0]);
      }
      out[c0] = static_cast<scalar_t>(a);
    }
    if (dsum) {
      acc_t total = 0;
      for (int64_t q = q0; q < q1; ++q) total += static_cast<acc_t>(coef[pairs[q]]);
      dsum[i] = static_cast<scalar_t>(total);
    }
  }
}

template <typename scalar_t>
void scatter_rows_range(const FeatureCsr& csr, const scalar_t* coef, const scalar_t* y, scalar_t* dW,
                        scalar_t* dsum, int64_t i0, int64_t i1, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  with_column_block<acc_t>([&](auto C) {
    scatter_rows_range_blocked<scalar_t, decltype(C)::value>(csr, coef, y, dW, dsum, i0, i1, d);
  });
}

// dW[i] = sum_{p in csr[i]} coef[p] * y[p / k]; optionally dsum[i] = sum coef[p].
// Writes every row of dW (zeros for features no pair selected).
template <typename scalar_t>
void scatter_rows(const FeatureCsr& csr,
                  const scalar_t* coef,  // [B, k]
                  const scalar_t* y,     // [B, d]
                  scalar_t* dW,          // [F, d]
                  scalar_t* dsum,        // [F] or nullptr
                  int64_t /*F: csr.num_rows()*/, int64_t /*k*/, int64_t d) {
  at::parallel_for(0, csr.num_rows(), grain_for(d * 4), [&](int64_t i0, int64_t i1) {
    scatter_rows_range<scalar_t>(csr, coef, y, dW, dsum, i0, i1, d);
  });
}

// Features [i0, i1) of dot_scatter_rows, C columns at a time: the C dW sums
// of a column block stay in registers while the feature's pairs go by, and
// each pair's dot collects L lane sums and a tail sum beside it, added up at
// the end exactly as dot() adds them (so dv is row_dot's to the bit, and dW
// scatter_rows').
template <typename scalar_t, int64_t C>
DUALENC_SIMD void dot_scatter_rows_range_blocked(const FeatureCsr& csr, const scalar_t* g, const scalar_t* coef,
                                                 const scalar_t* W, scalar_t* dv, scalar_t* dW, int64_t i0,
                                                 int64_t i1, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = 16;
  const int64_t* __restrict__ rowptr = csr.rowptr.data();
  const int64_t* __restrict__ pairs = csr.pairs.data();
  const int32_t* __restrict__ rows = csr.rows.data();
  const int64_t qend = rowptr[i1];
  const int64_t dC = d / C * C, d16 = d / L * L;
  std::vector<acc_t> scratch;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t q0 = rowptr[i], q1 = rowptr[i + 1], n = q1 - q0;
    const int64_t ahead = std::min(q1 + n + 2, qend);
    for (int64_t q = q1; q < ahead; ++q) __builtin_prefetch(g + int64_t(rows[q]) * d);
    if (i + 1 < i1) __builtin_prefetch(W + (i + 1) * d);
    if (static_cast<int64_t>(scratch.size()) < n * (L + 1)) scratch.resize(static_cast<size_t>(n * (L + 1)));
    acc_t* __restrict__ part = scratch.data();  // per pair: L lane sums, then the tail's sum
    for (int64_t m = 0; m < n * (L + 1); ++m) part[m] = 0;
    const scalar_t* __restrict__ w = W + i * d;
    scalar_t* __restrict__ out = dW + i * d;
    for (int64_t c0 = 0; c0 < dC; c0 += C) {
      acc_t a[C] = {};
      const bool more = c0 + C < d;
      for (int64_t q = q0; q < q1; ++q) {
        const acc_t v = static_cast<acc_t>(coef[pairs[q]]);
        const scalar_t* __restrict__ gr = g + int64_t(rows[q]) * d + c0;
        if (more) prefetch_next_block<C>(gr);
        acc_t* __restrict__ pp = part + (q - q0) * (L + 1);
        for (int64_t c = 0; c < C; ++c) a[c] += v * static_cast<acc_t>(gr[c]);
        for (int64_t c = 0; c < C; c += L) {
          for (int64_t l = 0; l < L; ++l) pp[l] += static_cast<acc_t>(gr[c + l]) * static_cast<acc_t>(w[c0 + c + l]);
        }
      }
      store<scalar_t, acc_t>(out + c0, a, C);
    }
    if (dC < d) {  // the columns past the last whole block
      for (int64_t c = dC; c < d; ++c) {
        acc_t a = 0;
        for (int64_t q = q0; q < q1; ++q) {
          a += static_cast<acc_t>(coef[pairs[q]]) * static_cast<acc_t>(g[int64_t(rows[q]) * d + c]);
        }
        out[c] = static_cast<scalar_t>(a);
      }
      for (int64_t q = q0; q < q1; ++q) {
        const scalar_t* __restrict__ gr = g + int64_t(rows[q]) * d;
        acc_t* __restrict__ pp = part + (q - q0) * (L + 1);
        for (int64_t c = dC; c < d16; c += L) {
          for (int64_t l = 0; l < L; ++l) pp[l] += static_cast<acc_t>(gr[c + l]) * static_cast<acc_t>(w[c + l]);
        }
        for (int64_t c = d16; c < d; ++c) pp[L] += static_cast<acc_t>(gr[c]) * static_cast<acc_t>(w[c]);
      }
    }
    // each dot as dot() sums it: the tail first, then the lanes in order
    for (int64_t q = q0; q < q1; ++q) {
      const acc_t* pp = part + (q - q0) * (L + 1);
      acc_t s = pp[L];
      for (int64_t l = 0; l < L; ++l) s += pp[l];
      dv[pairs[q]] = static_cast<scalar_t>(s);
    }
  }
}

template <typename scalar_t>
void dot_scatter_rows_range(const FeatureCsr& csr, const scalar_t* g, const scalar_t* coef, const scalar_t* W,
                            scalar_t* dv, scalar_t* dW, int64_t i0, int64_t i1, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  with_column_block<acc_t>([&](auto C) {
    dot_scatter_rows_range_blocked<scalar_t, decltype(C)::value>(csr, g, coef, W, dv, dW, i0, i1, d);
  });
}

// Feature-major backward of a gather-sum out[b] = sum_j coef[b,j] W[idx[b,j]]
// with upstream gradient g, both products in one pass over the code's CSR:
//   dv[p] = <g[p / k], W[i]>   and   dW[i] = sum_{p in csr[i]} coef[p] * g[p / k].
// Each W row is read once, in order; each pair's g row serves both products.
// Writes every dW row; deterministic (each dv entry has one writer, each dW
// row sums its pairs in increasing pair id).
template <typename scalar_t>
void dot_scatter_rows(const FeatureCsr& csr,
                      const scalar_t* g,     // [B, d]
                      const scalar_t* coef,  // [B, k]
                      const scalar_t* W,     // [F, d]
                      scalar_t* dv,          // [B, k]
                      scalar_t* dW,          // [F, d]
                      int64_t d) {
  at::parallel_for(0, csr.num_rows(), grain_for(d * 8), [&](int64_t i0, int64_t i1) {
    dot_scatter_rows_range<scalar_t>(csr, g, coef, W, dv, dW, i0, i1, d);
  });
}

// The primitive set the shared host code (ops/sparse_impl.h) runs on.
// out[p] = block[rows[q], f - f0] for every pair q = (b, j) of the features f
// in [f0, f0 + n): the selected entries of a [B, n] slice of a dense product
// (columns = features f0 .. f0 + n - 1), read through the code's transpose.
template <typename scalar_t>
void gather_transposed(const FeatureCsr& csr,
                       const scalar_t* block,  // [B, n]
                       int64_t f0, int64_t n,
                       scalar_t* out) {        // [B * k], by pair id
  const int64_t* rowptr = csr.rowptr.data();
  const int64_t* pairs = csr.pairs.data();
  const int32_t* rows = csr.rows.data();
  const int64_t pairs_in = rowptr[f0 + n] - rowptr[f0];
  at::parallel_for(f0, f0 + n, std::max<int64_t>(1, n * 16384 / std::max<int64_t>(1, pairs_in)),
                   [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* col = block + (i - f0);
      for (int64_t q = rowptr[i]; q < rowptr[i + 1]; ++q) out[pairs[q]] = col[int64_t(rows[q]) * n];
    }
  });
}

struct Prims {
  using Csr = FeatureCsr;
  template <typename T>
  static void gather_sum(const T* coef, const int64_t* idx, const T* W, const T* bias, T* out, int64_t B,
                         int64_t k, int64_t d) {
    cpu::gather_sum<T>(coef, idx, W, bias, out, B, k, d);
  }
  template <typename T>
  static void row_dot(const T* g, const int64_t* idx, const T* W, T* out, int64_t B, int64_t k, int64_t d) {
    cpu::row_dot<T>(g, idx, W, out, B, k, d);
  }
  template <typename T>
  static void scatter_rows(const Csr& csr, const T* coef, const T* y, T* dW, T* dsum, int64_t F, int64_t k,
                           int64_t d) {
    cpu::scatter_rows<T>(csr, coef, y, dW, dsum, F, k, d);
  }
  template <typename T>
  static void gather_transposed(const Csr& csr, const T* block, int64_t f0, int64_t n, T* out) {
    cpu::gather_transposed<T>(csr, block, f0, n, out);
  }
};

}  // namespace dualenc_fast::cpu
