// CPU kernels of topk_encode: a blocked encoder GEMM (one [rows, F] block at a
// time, never the whole [B, F]) followed by a per-row heap selection run in
// parallel over rows; the backward is the sparse primitives only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "checks.h"
#include "ops/cpu/primitives.h"
#include "ops/topk_encode.h"

namespace dualenc_fast::cpu {
namespace {

template <typename acc_t>
struct Candidate {
  acc_t v;
  int64_t i;
};
// a ranks ahead of b: larger value, then lower feature index.
template <typename acc_t>
inline bool ahead(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// Top-k of ReLU(z[0..F)) under the tie rule, written sorted. Returns false if
// a NaN was seen. `heap` is scratch of capacity k.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
bool select_row(const scalar_t* z, int64_t F, int64_t k, scalar_t* out_v, int64_t* out_i,
                std::vector<Candidate<acc_t>>& heap) {
  bool finite = true;
  auto relu = [&](scalar_t raw) {
    const acc_t f = static_cast<acc_t>(raw);
    if (f != f) finite = false;
    return f > acc_t(0) ? f : acc_t(0);
  };
  const auto ahead_ = ahead<acc_t>;
  heap.clear();
  for (int64_t i = 0; i < k; ++i) heap.push_back({relu(z[i]), i});
  // a max-heap under `ahead` keeps the weakest selected candidate at the front
  std::make_heap(heap.begin(), heap.end(), ahead_);
  acc_t threshold = heap.front().v;
  for (int64_t i = k; i < F; ++i) {
    const acc_t f = relu(z[i]);
    // later indices lose ties, so only a strictly larger value enters
    if (f > threshold) {
      std::pop_heap(heap.begin(), heap.end(), ahead_);
      heap.back() = {f, i};
      std::push_heap(heap.begin(), heap.end(), ahead_);
      threshold = heap.front().v;
    }
  }
  std::sort(heap.begin(), heap.end(), ahead_);
  for (int64_t j = 0; j < k; ++j) {
    out_v[j] = static_cast<scalar_t>(heap[j].v);
    out_i[j] = heap[j].i;
  }
  return finite;
}

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x,       // [B, d]
                                                   const at::Tensor& weight,  // [F, d]
                                                   const at::Tensor& bias,    // [F]
                                                   int64_t k,
                                                   const std::optional<at::Tensor>& pre_bias) {  // [d]
  check_topk_encode_args(x, weight, bias, k, pre_bias);
  const auto xe = centered_input(x, pre_bias);
  const auto W = weight.contiguous();
  const auto b = bias.contiguous();
  const int64_t B = xe.size(0), F = W.size(0);
  auto values = at::empty({B, k}, xe.options());
  auto indices = at::empty({B, k}, xe.options().dtype(at::kLong));
  if (B == 0) return {values, indices};
  // one block of pre-activations (~8 MiB) at a time: it stays near the cache
  // and nothing of size [B, F] is ever allocated
  const int64_t rows = encode_block_rows(B, F, xe.element_size(), int64_t(8) << 20);
  const auto Wt = W.t();
  std::atomic<bool> finite{true};
  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t nr = std::min(rows, B - r0);
    const auto z = at::addmm(b, xe.narrow(0, r0, nr), Wt).contiguous();  // [nr, F]
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xe.scalar_type(), "topk_encode_cpu", [&] {
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      scalar_t* vp = values.mutable_data_ptr<scalar_t>() + r0 * k;
      int64_t* ip = indices.mutable_data_ptr<int64_t>() + r0 * k;
      at::parallel_for(0, nr, grain_for(F, 1 << 16), [&](int64_t a, int64_t e) {
        std::vector<Candidate<at::opmath_type<scalar_t>>> heap;
        heap.reserve(k);
        for (int64_t r = a; r < e; ++r) {
          if (!select_row<scalar_t>(zp + r * F, F, k, vp + r * k, ip + r * k, heap)) finite = false;
        }
      });
    });
  }
  TORCH_CHECK_VALUE(finite.load(), "dualenc_fast: topk_encode found a NaN pre-activation: check ",
                    "the arguments 'x', 'weight' and 'bias' for NaN values");
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cpu(
    const at::Tensor& grad_values,  // [B, k]
    const at::Tensor& values,       // [B, k]
    const at::Tensor& indices,      // [B, k] int64
    const at::Tensor& x,            // [B, d]
    const at::Tensor& weight,       // [F, d]
    const std::optional<at::Tensor>& pre_bias,  // [d] or None
    bool need_x_grad, bool need_weight_grad) {
  check_topk_encode_backward_args(grad_values, values, indices, x, weight, pre_bias);
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const auto W = weight.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = W.size(0), d = W.size(1);
  // a selected value that ReLU clamped to zero passes no gradient
  const auto g = at::mul(grad_values, v.gt(0)).contiguous();
  auto grad_x = need_x_grad ? at::empty({B, d}, v.options()) : at::empty({0}, v.options());
  auto grad_w = need_weight_grad ? at::empty({F, d}, v.options()) : at::empty({0}, v.options());
  auto grad_b = need_weight_grad ? at::empty({F}, v.options()) : at::empty({0}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "topk_encode_backward_cpu", [&] {
    if (need_x_grad) {
      gather_sum<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                           W.const_data_ptr<scalar_t>(), nullptr,
                           grad_x.mutable_data_ptr<scalar_t>(), B, k, d);
    }
    if (need_weight_grad) {
      const auto xe = centered_input(x, pre_bias);
      const FeatureCsr csr(idx.const_data_ptr<int64_t>(), B * k, F);
      scatter_rows<scalar_t>(csr, g.const_data_ptr<scalar_t>(), xe.const_data_ptr<scalar_t>(),
                             grad_w.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>(),
                             k, d);
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
