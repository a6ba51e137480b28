// CUDA kernel of sparse_weight_grads: the shared host code
// (ops/sparse_weight_grads_impl.h) under a device guard, its gather form one
// launch of weight_grads_kernel over one FeatureCsr of the code, then the
// second stage (reduce_partials) for the features with several work items.
//
// weight_grads_kernel, block (item, column slice): the item's pairs are
// staged in shared memory (each pair's row offset b * d, its value, its
// grad_pre entry and its top-n flag j < n, with j = p - b * k from the stored
// int32 batch row: no division); then each thread walks them in order for its
// own columns, reading each pair's grad_dec, grad_lin (top-n pairs only; the
// grad_dec load when both are one tensor) and x rows once, 16 bytes at a time
// where every row tensor allows it (plain loads otherwise), and updating three
// float32 accumulator sets (dW_dec, dW_lin, dW_enc); db_enc is summed by one
// thread from the staged grad_pre. Columns are laid out as in
// feature_rows_kernel (primitives.cuh): kWgCols per thread and pass, M vectors
// of VW, a warp's loads consecutive, kWgPairsInFlight pairs' loads issued
// before their multiply-adds.
//
// Summation order: each column pair by pair in item order, partial rows in
// item order (no atomics): bitwise the same on every schedule. dW_dec, dW_enc
// and db_enc use the same CSR, items and order as scatter_rows in
// sparse_decode_backward and topk_encode_backward, so they are those ops'
// results to the bit; dW_lin is too for every feature with one work item (at
// most kPairsPerItem pairs), while a feature with several items is cut at
// other pairs than the [B, n] code's own CSR cuts it: the same terms in the
// same order, partial sums grouped differently (within rounding).
//
// Cost at the paper's shape (B = 4096, d = 3200, F = 50000, k = 1024, n = 512:
// nnz = 4.19 M pairs, 2.1 M of them top-n) in float32, with the H100 model of
// primitives.cuh; nvcc 13.0 sm_90: 48 registers with 16-byte loads (64
// plain), no spills, 4 slices of 224 threads, 6 blocks per SM, 2 pairs x 3
// rows x 16 B = 96 B in flight per thread (129 KB per SM, over the ~36 KB L2
// latency needs); bfloat16: 80 registers, 2 slices, 3 blocks per SM. Rows read: grad_dec and x once per pair (53.7 GB each) and grad_lin
// once per top-n pair (26.8 GB; none when grad_lin is grad_dec, as in the
// joint model where both are dL/drecon): 107-134 GB, mostly from L2 (the
// blocks resident at once share one column slice of the rows): 15-24 ms.
// The three scatter_rows passes it replaces read the same 134 GB (8-10 ms for
// each 53.7 GB) and build three CSRs (sorts of 4.19 M, 2.1 M and 4.19 M keys);
// this pass saves those two extra CSRs and launches, the second read of the
// pair data, and 26.8 GB (4-5 ms) when grad_lin is grad_dec. Any design that
// reads rows per pair has this floor; the review's high-density variant
// (column slices of all B rows staged in shared memory) is what goes under it.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/cuda/primitives.cuh"
#include "ops/sparse_weight_grads_impl.h"

namespace dualenc_fast::cuda {
namespace {

// Columns per thread and pass: one 16-byte vector (4 in float32, 8 in 16
// bits), half of scatter_rows' 8 float32 columns, so the blocks resident at
// once share a column slice half as wide: at B = 4096 and d = 3200 in float32,
// 896 columns, 14.7 MB of each row tensor, 44 MB for all three (29 MB when
// grad_lin is grad_dec), under the 50 MB L2, where scatter_rows' 1792 columns
// of one tensor take 29 MB.
template <typename scalar_t>
constexpr int kWgCols = kVecWidth<scalar_t>;

// Pairs whose loads are issued before their multiply-adds (three rows each).
constexpr int kWgPairsInFlight = 2;

template <typename scalar_t, int VW>
__global__ void __launch_bounds__(kMaxRowThreads) weight_grads_kernel(
    const int64_t* __restrict__ rowptr,        // [F + 1]
    const int64_t* __restrict__ item_ptr,      // [F + 1]
    const int64_t* __restrict__ part_ptr,      // [F + 1]
    const int64_t* __restrict__ item_feature,  // [grid.x]
    const int64_t* __restrict__ pairs,         // [nnz]
    const int* __restrict__ rows,              // [nnz]
    const scalar_t* __restrict__ values,       // [B, k]
    const scalar_t* __restrict__ grad_pre,     // [B, k] or nullptr (when xe is)
    const scalar_t* __restrict__ grad_dec,     // [B, d] or nullptr
    const scalar_t* __restrict__ grad_lin,     // [B, d] or nullptr (may be grad_dec)
    const scalar_t* __restrict__ xe,           // [B, d] or nullptr
    scalar_t* __restrict__ dW_dec,             // [F, d] or nullptr (when grad_dec is)
    scalar_t* __restrict__ dW_lin,             // [F, d] or nullptr (when grad_lin is)
    scalar_t* __restrict__ dW_enc,             // [F, d] or nullptr (when xe is)
    scalar_t* __restrict__ db_enc,             // [F] or nullptr (when xe is)
    at::opmath_type<scalar_t>* __restrict__ part_dec,  // [*, d] or nullptr (when dW_dec is)
    at::opmath_type<scalar_t>* __restrict__ part_lin,  // [*, d] or nullptr (when dW_lin is)
    at::opmath_type<scalar_t>* __restrict__ part_enc,  // [*, d] or nullptr (when dW_enc is)
    at::opmath_type<scalar_t>* __restrict__ part_sum,  // [*] or nullptr (when db_enc is)
    int64_t F, int64_t k, int64_t n, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, VW>;
  constexpr int kCols = kWgCols<scalar_t>;
  static_assert(kCols % VW == 0, "a thread's columns are whole vectors");
  constexpr int M = kCols / VW;
  constexpr int U = kWgPairsInFlight;
  __shared__ int64_t s_off[kPairsPerItem];  // rows[q] * d
  __shared__ acc_t s_v[kPairsPerItem];      // values[p]
  __shared__ acc_t s_z[kPairsPerItem];      // grad_pre[p]
  __shared__ unsigned char s_top[kPairsPerItem];  // j < n
  CsrItem it;
  if (!csr_item(rowptr, item_ptr, part_ptr, item_feature, F, blockIdx.x, it)) return;
  const int cnt = static_cast<int>(it.q1 - it.q0);
  // wanted outputs (an input is nullptr when it is empty: B == 0 or d == 0)
  const bool dec = dW_dec != nullptr, lin = dW_lin != nullptr, enc = db_enc != nullptr;
  const bool lin_is_dec = lin && grad_lin == grad_dec;
  for (int t = threadIdx.x; t < cnt; t += blockDim.x) {
    const int64_t p = pairs[it.q0 + t];
    const int64_t b = rows[it.q0 + t];
    s_off[t] = b * d;
    s_v[t] = dec || lin ? static_cast<acc_t>(values[p]) : acc_t(0);
    s_z[t] = enc ? static_cast<acc_t>(grad_pre[p]) : acc_t(0);
    s_top[t] = lin && p - b * k < n;
  }
  __syncthreads();
  const int64_t T = blockDim.x;
  const int64_t stride = T * VW;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.y) * M * T + threadIdx.x) * VW;
  bool ok[M];  // inside the row
#pragma unroll
  for (int m = 0; m < M; ++m) ok[m] = col0 + m * stride < d;
  acc_t ad[M][VW], al[M][VW], ae[M][VW];
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int e = 0; e < VW; ++e) ad[m][e] = al[m][e] = ae[m][e] = 0;
  }
  // pairs [t, t + P): every load first, then the multiply-adds pair by pair
  // (columns past the row read as zeros: no branch in the arithmetic; the
  // branches on dec / lin / enc / top are uniform over the block)
  auto step = [&](auto width, int t) {
    constexpr int P = decltype(width)::value;
    vec_t gdv[P][M], glv[P][M], xv[P][M];
#pragma unroll
    for (int u = 0; u < P; ++u) {
      const int64_t off = s_off[t + u] + col0;
      const bool top = s_top[t + u];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const bool in = ok[m];
        gdv[u][m] = dec && in ? load_vec<VW>(grad_dec + off + m * stride) : vec_t{};
        glv[u][m] = top && !lin_is_dec && in ? load_vec<VW>(grad_lin + off + m * stride) : vec_t{};
        xv[u][m] = enc && in ? load_vec<VW>(xe + off + m * stride) : vec_t{};
      }
    }
#pragma unroll
    for (int u = 0; u < P; ++u) {
      const acc_t v = s_v[t + u], z = s_z[t + u];
      const bool top = s_top[t + u];
#pragma unroll
      for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const acc_t g = static_cast<acc_t>(gdv[u][m].v[e]);
          if (dec) ad[m][e] += v * g;
          if (top) al[m][e] += v * (lin_is_dec ? g : static_cast<acc_t>(glv[u][m].v[e]));
          if (enc) ae[m][e] += z * static_cast<acc_t>(xv[u][m].v[e]);
        }
      }
    }
  };
  int t = 0;
  for (; t + U <= cnt; t += U) step(std::integral_constant<int, U>{}, t);
  for (; t < cnt; ++t) step(std::integral_constant<int, 1>{}, t);
  // a feature with one item writes its rows, one with several its partial rows
  auto write = [&](scalar_t* out, acc_t* part, const acc_t (&acc)[M][VW]) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (!ok[m]) continue;
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const int64_t c = col0 + m * stride + e;
        if (it.partial < 0) {
          out[it.feature * d + c] = static_cast<scalar_t>(acc[m][e]);
        } else {
          part[it.partial * d + c] = acc[m][e];
        }
      }
    }
  };
  if (dec) write(dW_dec, part_dec, ad);
  if (lin) write(dW_lin, part_lin, al);
  if (enc) write(dW_enc, part_enc, ae);
  if (enc && blockIdx.y == 0 && threadIdx.x == 0) {
    acc_t total = 0;
    for (int q = 0; q < cnt; ++q) total += s_z[q];
    if (it.partial < 0) {
      db_enc[it.feature] = static_cast<scalar_t>(total);
    } else {
      part_sum[it.partial] = total;
    }
  }
}

// The gather form's pass: weight_grads_kernel per (item, column slice), then
// reduce_partials per wanted output for the features with several items.
template <typename scalar_t>
void weight_grads(const FeatureCsr& csr, const WeightGradsPtrs<scalar_t>& p, int64_t k, int64_t n, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  if (csr.F == 0) return;
  const bool dec = p.dW_dec != nullptr, lin = p.dW_lin != nullptr, enc = p.db_enc != nullptr;
  const int outs = int(dec) + int(lin) + int(enc);
  const auto opt = csr.rowptr.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t R = csr.partial_rows_bound();
  const at::Tensor part = at::empty({outs, R, d}, opt);  // the partial rows of each wanted output
  const at::Tensor part_sum = enc ? at::empty({R}, opt) : at::Tensor();
  at::Tensor slot[3];  // dec, lin, enc
  int next = 0;
  if (dec) slot[0] = part.select(0, next++);
  if (lin) slot[1] = part.select(0, next++);
  if (enc) slot[2] = part.select(0, next++);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? static_cast<acc_t*>(t.data_ptr()) : nullptr; };
  constexpr int kVec = kVecWidth<scalar_t>;
  const bool vec = (!dec || vector_rows(p.grad_dec, d, kVec)) && (!lin || vector_rows(p.grad_lin, d, kVec)) &&
                   (!enc || vector_rows(p.xe, d, kVec));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto width) {
    constexpr int VW = decltype(width)::value;
    const RowPlan plan = plan_rows(d, VW, kWgCols<scalar_t>);
    const dim3 grid(checked_grid(csr.item_bound(), "weight_grads"), checked_grid_y(plan.slices, "weight_grads"));
    DUALENC_LAUNCH((weight_grads_kernel<scalar_t, VW>), grid, plan.threads, 0, stream)(
        csr.rowptr.const_data_ptr<int64_t>(), csr.item_ptr.const_data_ptr<int64_t>(),
        csr.part_ptr.const_data_ptr<int64_t>(), csr.item_feature.const_data_ptr<int64_t>(),
        csr.pairs.const_data_ptr<int64_t>(), csr.rows.const_data_ptr<int>(), p.values, p.grad_pre, p.grad_dec,
        p.grad_lin, p.xe, p.dW_dec, p.dW_lin, p.dW_enc, p.db_enc, ptr(slot[0]), ptr(slot[1]), ptr(slot[2]),
        ptr(part_sum), csr.F, k, n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  if (dec) reduce_partials<scalar_t>(csr, slot[0], at::Tensor(), p.dW_dec, nullptr, d);
  if (lin) reduce_partials<scalar_t>(csr, slot[1], at::Tensor(), p.dW_lin, nullptr, d);
  if (enc) reduce_partials<scalar_t>(csr, slot[2], part_sum, p.dW_enc, p.db_enc, d);
}

struct WeightGradsPrims : Prims {
  template <typename T>
  static void weight_grads(const Csr& csr, const WeightGradsPtrs<T>& p, int64_t k, int64_t n, int64_t d) {
    cuda::weight_grads<T>(csr, p, k, n, d);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_weight_grads_cuda(
    const at::Tensor& indices,                  // [B, k] int64
    const at::Tensor& values,                   // [B, k]
    const std::optional<at::Tensor>& grad_pre,  // [B, k] or None
    const std::optional<at::Tensor>& grad_dec,  // [B, d] or None
    const std::optional<at::Tensor>& grad_lin,  // [B, d] or None
    const std::optional<at::Tensor>& x,         // [B, d] or None
    const std::optional<at::Tensor>& pre_bias,  // [d] or None
    int64_t num_features, int64_t n, bool check_indices, int64_t sparse_form) {
  const c10::cuda::CUDAGuard guard(values.device());
  return sparse_weight_grads_impl<WeightGradsPrims>(indices, values, grad_pre, grad_dec, grad_lin, x, pre_bias,
                                                    num_features, n, check_indices, sparse_form);
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("sparse_weight_grads", &dualenc_fast::cuda::sparse_weight_grads_cuda);
}
