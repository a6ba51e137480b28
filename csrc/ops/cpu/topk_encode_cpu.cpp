// CPU kernels of topk_encode: the encoder GEMM in column tiles of F (each tile
// ~8 MiB, never the whole [B, F]); after each tile, a per-row running heap
// (parallel over rows) takes in bias + ReLU + selection as the epilogue. The
// backward is the sparse primitives only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "buffer_cache.h"
#include "checks.h"
#include "csr_share.h"
#include "ops/cpu/primitives.h"
#include "ops/sparse_impl.h"
#include "ops/topk_encode.h"

namespace dualenc_fast::cpu {

// Bit l set for each l in [0, 16) whose z[l] + bias[l] is above `threshold`
// or NaN (a compare the compiler vectorises into one mask).
template <typename scalar_t, typename acc_t>
DUALENC_SIMD uint32_t block_entry_mask(const scalar_t* __restrict__ z, const scalar_t* __restrict__ bias,
                                       acc_t threshold) {
  uint32_t mask = 0;
  for (int l = 0; l < 16; ++l) {
    const acc_t f = static_cast<acc_t>(z[l]) + static_cast<acc_t>(bias[l]);
    mask |= static_cast<uint32_t>(!(f <= threshold)) << l;  // true for f > threshold and for NaN
  }
  return mask;
}

namespace {

template <typename acc_t>
struct Candidate {
  acc_t v;
  int64_t i;
};
// a ranks ahead of b: larger value, then lower feature index; NaN ranks
// above every number (as in torch.topk), NaNs among themselves by index.
template <typename acc_t>
inline bool ahead(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  const bool an = a.v != a.v, bn = b.v != b.v;
  if (an || bn) return an && (!bn || a.i < b.i);
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// Running top-k of one row across column tiles, under the tie rule. Columns
// arrive in increasing feature index, so a later column never wins a tie.
// Candidates that beat the threshold (the k-th best value at the last
// compaction) are appended to a buffer of 2k; a full buffer is cut back to
// its k best with nth_element, which raises the threshold. An append costs
// far less than a heap update, and a compaction is linear in the buffer.
template <typename acc_t>
struct RowSelector {
  Candidate<acc_t>* buf;  // capacity 2k
  int64_t size = 0;
  int64_t k = 0;
  acc_t* vals = nullptr;              // scratch of 2k values, shared by a thread's rows
  Candidate<acc_t>* ties = nullptr;   // scratch of 2k candidates, likewise
  acc_t threshold = 0;  // the k-th best value at the last compaction (valid once size >= k):
                        // a number must exceed it to enter, a NaN enters unless it is NaN
  bool nan_held = false;  // whether a NaN ever entered (the comparisons need the NaN rule then)

  void compact() {
    if (nan_held) {
      std::nth_element(buf, buf + (k - 1), buf + size, ahead<acc_t>);
      size = k;
      threshold = buf[k - 1].v;
      return;
    }
    // Numbers only: the k-th best value t by a selection over the bare values
    // (a cheaper comparison than the (value, index) pair's), then keep every
    // candidate above t and, of those equal to t, the ones with the lowest
    // feature indices (a second selection only when more tie than fit).
    for (int64_t j = 0; j < size; ++j) vals[j] = buf[j].v;
    std::nth_element(vals, vals + (k - 1), vals + size, std::greater<acc_t>());
    const acc_t t = vals[k - 1];
    int64_t kept = 0, tied = 0;
    for (int64_t j = 0; j < size; ++j) {
      const Candidate<acc_t> c = buf[j];
      if (c.v > t) {
        buf[kept++] = c;
      } else if (c.v == t) {
        ties[tied++] = c;
      }
    }
    const int64_t room = k - kept;  // >= 1: t itself is among the k best
    if (tied > room) {
      std::nth_element(ties, ties + (room - 1), ties + tied,
                       [](const Candidate<acc_t>& a, const Candidate<acc_t>& b) { return a.i < b.i; });
    }
    for (int64_t j = 0; j < room; ++j) buf[kept++] = ties[j];
    size = k;
    threshold = t;
  }

  // Offer ReLU(z[c] + bias[c]) for features f0 + c, c in [0, n). ReLU keeps
  // NaN, and a NaN ranks first (the loss goes NaN, as in the reference).
  template <typename scalar_t>
  void offer(const scalar_t* z, const scalar_t* bias, int64_t f0, int64_t n) {
    int64_t c = 0;
    for (; c < n && size < k; ++c) {
      const acc_t f = static_cast<acc_t>(z[c]) + static_cast<acc_t>(bias[c]);
      nan_held |= f != f;
      buf[size++] = {f <= acc_t(0) ? acc_t(0) : f, f0 + c};
      if (size == k) {
        int64_t weakest = 0;
        for (int64_t j = 1; j < k; ++j) {
          if (ahead(buf[weakest], buf[j])) weakest = j;
        }
        threshold = buf[weakest].v;
      }
    }
    if (c == n) return;
    // Once k values are in almost every value loses to the threshold: test a
    // block of kBlock values branch-free (one vector compare into a bit mask)
    // and visit only the set bits. The buffer, its size and the threshold live
    // in locals here, so the loop keeps them in registers (stores into the
    // buffer could otherwise alias the members).
    constexpr int64_t kBlock = 16;
    const int64_t cap = 2 * k;
    Candidate<acc_t>* const b = buf;
    int64_t sz = size;
    acc_t thr = threshold;
    for (; c < n; c += kBlock) {
      // k NaNs held: a later feature (higher index) can no longer enter
      if (thr != thr) break;
      const int64_t m = std::min(kBlock, n - c);
      uint32_t mask = m == kBlock ? block_entry_mask<scalar_t, acc_t>(z + c, bias + c, thr)
                                  : (uint32_t{1} << m) - 1;
      while (mask != 0) {
        const int l = __builtin_ctz(mask);
        mask &= mask - 1;
        const acc_t f = static_cast<acc_t>(z[c + l]) + static_cast<acc_t>(bias[c + l]);
        // larger, or NaN (an equal value is a lost tie); the threshold may
        // have risen since the mask was taken
        if (f > thr || f != f) {
          nan_held |= f != f;
          b[sz].v = f;
          b[sz].i = f0 + c + l;
          if (++sz == cap) {
            size = sz;
            compact();
            sz = size;
            thr = threshold;
          }
        }
      }
    }
    size = sz;
  }

  template <typename scalar_t>
  void write(scalar_t* out_v, int64_t* out_i) {
    if (size > k) compact();
    std::sort(buf, buf + k, ahead<acc_t>);
    for (int64_t j = 0; j < k; ++j) {
      out_v[j] = static_cast<scalar_t>(buf[j].v);
      out_i[j] = buf[j].i;
    }
  }
};

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x,       // [B, d]
                                                   const at::Tensor& weight,  // [F, d]
                                                   const at::Tensor& bias,    // [F]
                                                   int64_t k,
                                                   const std::optional<at::Tensor>& pre_bias) {  // [d]
  auto a = prepare_topk_encode(x, weight, bias, k, pre_bias);
  const at::Tensor &xe = a.xe, &W = a.W, &b = a.b;
  at::Tensor &values = a.values, &indices = a.indices;
  const int64_t B = a.B, F = a.F;
  if (B == 0) return {values, indices};
  // Each thread owns a contiguous block of rows and runs, for it, the GEMM in
  // tiles of [rows, cols] pre-activations (single-threaded inside the parallel
  // region) and the selection right after each tile, while the tile is in its
  // cache: one parallel region per call, no barrier between tiles, and
  // nothing [B, F] is allocated.
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (B + nt - 1) / nt;
  const int64_t rows = std::min<int64_t>(per_thread, 512);
  const int64_t cols = std::min<int64_t>(F, 512);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xe.scalar_type(), "topk_encode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, per_thread, [&](int64_t ra, int64_t re) {
      std::vector<Candidate<acc_t>> bufs(static_cast<size_t>(rows * 2 * k));
      std::vector<acc_t> vals(static_cast<size_t>(2 * k));
      std::vector<Candidate<acc_t>> ties(static_cast<size_t>(2 * k));
      std::vector<RowSelector<acc_t>> sel(static_cast<size_t>(rows));
      for (int64_t r0 = ra; r0 < re; r0 += rows) {
        const int64_t nr = std::min(rows, re - r0);
        for (int64_t r = 0; r < nr; ++r) sel[r] = RowSelector<acc_t>{bufs.data() + r * 2 * k, 0, k, vals.data(), ties.data()};
        const auto xb = xe.narrow(0, r0, nr);
        for (int64_t f0 = 0; f0 < F; f0 += cols) {
          const int64_t nc = std::min(cols, F - f0);
          const auto z = at::mm(xb, W.narrow(0, f0, nc).t()).contiguous();  // [nr, nc]
          const scalar_t* zp = z.const_data_ptr<scalar_t>();
          for (int64_t r = 0; r < nr; ++r) sel[r].offer(zp + r * nc, bp + f0, f0, nc);
        }
        scalar_t* vp = values.mutable_data_ptr<scalar_t>() + r0 * k;
        int64_t* ip = indices.mutable_data_ptr<int64_t>() + r0 * k;
        for (int64_t r = 0; r < nr; ++r) sel[r].write(vp + r * k, ip + r * k);
      }
    });
  });
  mark_shared_code(indices);  // its backward products share one transpose (csr_share.h)
  return {values, indices};
}

// The gather form of the backward on CPU: the ReLU mask applied while the
// coefficients are copied (no [B, k] temporaries from ATen), weight gradients
// in memory from the buffer cache. The dense form is the shared host code's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cpu(
    const at::Tensor& grad_values, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& pre_bias, bool need_x_grad,
    bool need_weight_grad, bool check_indices, int64_t sparse_form) {
  if (resolve_sparse_form(sparse_form, values, values.size(1), weight.size(0)) > 0) {
    return topk_encode_backward_impl<Prims>(grad_values, values, indices, x, weight, pre_bias, need_x_grad,
                                            need_weight_grad, check_indices, sparse_form);
  }
  check_topk_encode_backward_args(grad_values, values, indices, x, weight, pre_bias, check_indices);
  const auto gv = grad_values.contiguous();
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  auto grad_x = need_x_grad ? at::empty({B, d}, v.options()) : at::empty({0}, v.options());
  auto grad_w = need_weight_grad ? empty_cached({F, d}, v.options()) : at::empty({0}, v.options());
  auto grad_b = need_weight_grad ? at::empty({F}, v.options()) : at::empty({0}, v.options());
  if (!need_x_grad && !need_weight_grad) return {grad_x, grad_w, grad_b};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "topk_encode_backward_cpu", [&] {
    // a selected value that ReLU clamped to zero passes no gradient (a NaN
    // passes it, as torch's relu backward)
    std::vector<scalar_t> g(static_cast<size_t>(B * k));
    const scalar_t* gp = gv.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * k, 1 << 14, [&](int64_t a, int64_t e) {
      for (int64_t p = a; p < e; ++p) g[p] = static_cast<at::opmath_type<scalar_t>>(vp[p]) <= 0 ? scalar_t(0) : gp[p];
    });
    if (need_x_grad) {
      gather_sum<scalar_t>(g.data(), idx.const_data_ptr<int64_t>(), W.const_data_ptr<scalar_t>(), nullptr,
                           grad_x.mutable_data_ptr<scalar_t>(), B, k, d);
    }
    if (need_weight_grad) {
      const auto xe = centered_input(x, pre_bias);
      const auto csr_p = shared_csr<FeatureCsr>(indices, F, [&] { return FeatureCsr(idx, F); });
      const auto& csr = *csr_p;
      scatter_rows<scalar_t>(csr, g.data(), xe.const_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<scalar_t>(),
                             grad_b.mutable_data_ptr<scalar_t>(), F, k, d);
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace dualenc_fast::cpu

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("topk_encode", &dualenc_fast::cpu::topk_encode_cpu);
  m.impl("topk_encode_backward", &dualenc_fast::cpu::topk_encode_backward_cpu);
}
