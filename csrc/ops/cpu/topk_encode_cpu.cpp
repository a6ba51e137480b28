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
#include <vector>

#include "checks.h"
#include "ops/cpu/primitives.h"
#include "ops/sparse_impl.h"
#include "ops/topk_encode.h"

namespace dualenc_fast::cpu {

// Whether any of z[0..16) + bias[0..16) is above `threshold` or NaN.
template <typename scalar_t, typename acc_t>
DUALENC_SIMD bool block_may_enter(const scalar_t* __restrict__ z, const scalar_t* __restrict__ bias,
                                  acc_t threshold) {
  int hit = 0;
  for (int l = 0; l < 16; ++l) {
    const acc_t f = static_cast<acc_t>(z[l]) + static_cast<acc_t>(bias[l]);
    hit |= !(f <= threshold);  // true for f > threshold and for NaN
  }
  return hit != 0;
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
template <typename acc_t>
struct RowSelector {
  Candidate<acc_t>* heap;  // capacity k; a max-heap under `ahead`: weakest first
  int64_t size = 0;
  int64_t k = 0;

  // Offer ReLU(z[c] + bias[c]) for features f0 + c, c in [0, n). ReLU keeps
  // NaN, and a NaN ranks first (the loss goes NaN, as in the reference).
  template <typename scalar_t>
  void offer(const scalar_t* z, const scalar_t* bias, int64_t f0, int64_t n) {
    int64_t c = 0;
    for (; c < n && size < k; ++c) {
      const acc_t f = static_cast<acc_t>(z[c]) + static_cast<acc_t>(bias[c]);
      heap[size++] = {f <= acc_t(0) ? acc_t(0) : f, f0 + c};
      if (size == k) std::make_heap(heap, heap + k, ahead<acc_t>);
    }
    // Once the heap is full almost every value loses to the threshold: test a
    // block of kBlock values branch-free (a loop the compiler vectorises) and
    // look at single values only in the rare block with a winner or a NaN.
    constexpr int64_t kBlock = 16;
    for (; c < n; c += kBlock) {
      // k NaNs held: a later feature (higher index) can no longer enter
      if (heap[0].v != heap[0].v) return;
      const int64_t m = std::min(kBlock, n - c);
      if (m == kBlock && !block_may_enter<scalar_t, acc_t>(z + c, bias + c, heap[0].v)) continue;
      for (int64_t l = c; l < c + m; ++l) {
        const Candidate<acc_t> cand{static_cast<acc_t>(z[l]) + static_cast<acc_t>(bias[l]), f0 + l};
        if (!(cand.v <= heap[0].v)) {  // larger, or NaN (an equal value is a lost tie)
          std::pop_heap(heap, heap + k, ahead<acc_t>);
          heap[k - 1] = cand;
          std::push_heap(heap, heap + k, ahead<acc_t>);
        }
      }
    }
  }

  template <typename scalar_t>
  void write(scalar_t* out_v, int64_t* out_i) {
    std::sort(heap, heap + k, ahead<acc_t>);
    for (int64_t j = 0; j < k; ++j) {
      out_v[j] = static_cast<scalar_t>(heap[j].v);
      out_i[j] = heap[j].i;
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
  // Tiles of [rows, cols] pre-activations (~8 MiB): column tiles let the GEMM
  // read each weight row once per row block, and nothing [B, F] is allocated.
  const int64_t rows = std::min<int64_t>(B, 4096);
  const int64_t cols = std::min<int64_t>(F, std::max<int64_t>(256, encode_block_rows(F, rows, xe.element_size(), int64_t(8) << 20)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xe.scalar_type(), "topk_encode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<Candidate<acc_t>> heaps(static_cast<size_t>(rows * k));
    std::vector<RowSelector<acc_t>> sel(static_cast<size_t>(rows));
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < B; r0 += rows) {
      const int64_t nr = std::min(rows, B - r0);
      for (int64_t r = 0; r < nr; ++r) sel[r] = RowSelector<acc_t>{heaps.data() + r * k, 0, k};
      const auto xb = xe.narrow(0, r0, nr);
      for (int64_t f0 = 0; f0 < F; f0 += cols) {
        const int64_t nc = std::min(cols, F - f0);
        const auto z = at::mm(xb, W.narrow(0, f0, nc).t()).contiguous();  // [nr, nc]
        const scalar_t* zp = z.const_data_ptr<scalar_t>();
        at::parallel_for(0, nr, grain_for(nc, 1 << 15), [&](int64_t a, int64_t e) {
          for (int64_t r = a; r < e; ++r) {
            sel[r].offer(zp + r * nc, bp + f0, f0, nc);
          }
        });
      }
      scalar_t* vp = values.mutable_data_ptr<scalar_t>() + r0 * k;
      int64_t* ip = indices.mutable_data_ptr<int64_t>() + r0 * k;
      at::parallel_for(0, nr, grain_for(k * 8), [&](int64_t a, int64_t e) {
        for (int64_t r = a; r < e; ++r) sel[r].write(vp + r * k, ip + r * k);
      });
    }
  });
  return {values, indices};
}

}  // namespace
}  // namespace dualenc_fast::cpu

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("topk_encode", &dualenc_fast::cpu::topk_encode_cpu);
  m.impl("topk_encode_backward", &dualenc_fast::topk_encode_backward_impl<dualenc_fast::cpu::Prims>);
}
