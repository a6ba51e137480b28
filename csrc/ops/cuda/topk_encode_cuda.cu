// CUDA kernels of topk_encode: the encoder GEMM (cuBLAS through at::addmm) in
// row blocks, then one thread block per row runs a radix select on the float
// bits of ReLU(z) (non-negative floats order like their bit patterns), gathers
// the winners (ties: lowest feature index, by an ordered block scan) and sorts
// them in shared memory. The backward is the sparse primitives only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "checks.h"
#include "ops/cuda/primitives.cuh"
#include "ops/sparse_impl.h"
#include "ops/topk_encode.h"

namespace dualenc_fast::cuda {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kMaxBlockSort = 2048;  // rows with k above this are sorted by at::sort
static_assert(kSelectThreads == 256, "the bucket scan gives each thread one of the 256 buckets");

// ReLU for the select. A NaN stays NaN, as one canonical NaN (bits 0x7fc00000:
// above +Inf's 0x7f800000, so it ranks first, as in torch.topk, and NaNs tie
// among themselves, lowest index first); the loss then goes NaN.
template <typename scalar_t>
__device__ __forceinline__ float relu_value(scalar_t raw) {
  const float f = static_cast<float>(raw);
  if (f != f) return __uint_as_float(0x7fc00000u);
  return f > 0.f ? f : 0.f;
}

// (value desc, index asc), NaN above every value
__device__ __forceinline__ bool ahead(float va, int ia, float vb, int ib) {
  const bool na = va != va, nb = vb != vb;
  if (na || nb) return na && (!nb || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// One block per row of z [rows, F]: writes the row's top-k, sorted when
// k <= kMaxBlockSort, to values/indices [rows, k].
template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads)
topk_select_kernel(const scalar_t* __restrict__ z,  // [rows, F]
                   scalar_t* __restrict__ out_v,     // [rows, k]
                   int64_t* __restrict__ out_i,      // [rows, k]
                   int64_t F, int64_t k) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned int s_prefix;
  __shared__ long long s_remaining;
  __shared__ unsigned int s_gt_count;
  __shared__ long long s_eq_base;
  __shared__ int s_done;
  __shared__ long long warp_total[kSelectThreads / kWarp];
  __shared__ int warp_counts[kSelectThreads / kWarp];
  __shared__ float sort_v[kMaxBlockSort];
  __shared__ int sort_i[kMaxBlockSort];

  const int tid = threadIdx.x;
  const int lane = tid % kWarp, warp = tid / kWarp;
  const int64_t row = blockIdx.x;
  const scalar_t* zr = z + row * F;
  scalar_t* ov = out_v + row * k;
  int64_t* oi = out_i + row * k;

  // --- radix select: the bit pattern T of the k-th largest value, 8 bits a pass
  unsigned int prefix = 0, mask = 0;
  long long remaining = k;  // how many of the values matching `prefix` are still wanted
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kSelectThreads) hist[b] = 0;
    __syncthreads();
    // ReLU makes most entries exactly 0 (bucket 0 in every pass): count those
    // per thread and add them once per warp instead of one shared atomic each
    unsigned int zeros = 0;
    for (int64_t i = tid; i < F; i += kSelectThreads) {
      const unsigned int u = __float_as_uint(relu_value(zr[i]));
      if ((u & mask) == prefix) {
        if (u == 0u) {
          ++zeros;
        } else {
          atomicAdd(&hist[(u >> shift) & 255u], 1u);
        }
      }
    }
    zeros = warp_sum(zeros);
    if (lane == 0 && zeros != 0u) atomicAdd(&hist[0], zeros);
    __syncthreads();
    // The chosen bucket is the highest b with (count in buckets >= b) >=
    // remaining. Thread t owns bucket 255 - t: an inclusive scan in thread
    // order (shuffles within each warp, then the warps' totals) gives each
    // thread that count; exactly one thread sees it reach `remaining` at its
    // own bucket (or, if no bucket does, bucket 0 takes the rest: the same
    // answer as a serial scan from bucket 255 down).
    {
      const long long own = hist[255 - tid];
      long long at_or_above = own;
#pragma unroll
      for (int off = 1; off < kWarp; off <<= 1) {
        const long long up = __shfl_up_sync(0xffffffffu, at_or_above, off);
        if (lane >= off) at_or_above += up;
      }
      if (lane == kWarp - 1) warp_total[warp] = at_or_above;
      __syncthreads();
      for (int w = 0; w < warp; ++w) at_or_above += warp_total[w];
      const long long above = at_or_above - own;
      const bool short_of = tid == kSelectThreads - 1 && at_or_above < remaining;  // bucket 0, all counted
      if ((at_or_above >= remaining && above < remaining) || short_of) {
        s_prefix = prefix | ((255u - static_cast<unsigned int>(tid)) << shift);
        s_remaining = remaining - (short_of ? at_or_above : above);
      }
    }
    __syncthreads();
    prefix = s_prefix;
    mask |= 255u << shift;
    remaining = s_remaining;
    __syncthreads();
  }
  const unsigned int T = prefix;
  const long long n_gt = k - remaining;  // values strictly above T: all selected
  const long long n_eq = remaining;      // values equal to T: the lowest-index ones

  // --- gather: > T anywhere in [0, n_gt); == T in index order into [n_gt, k)
  if (tid == 0) {
    s_gt_count = 0;
    s_eq_base = 0;
  }
  __syncthreads();
  for (int64_t start = 0; start < F; start += kSelectThreads) {
    const int64_t i = start + tid;
    float f = 0.f;
    unsigned int u = 0;
    if (i < F) {
      f = relu_value(zr[i]);
      u = __float_as_uint(f);
    }
    const bool gt = i < F && u > T;
    const bool eq = i < F && u == T;
    if (gt) {
      const unsigned int pos = atomicAdd(&s_gt_count, 1u);
      ov[pos] = static_cast<scalar_t>(f);
      oi[pos] = i;
    }
    const unsigned int ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    // every thread reads the 8 warp counts: its warp's offset and the total
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kSelectThreads / kWarp; ++w) {
      const int c = warp_counts[w];
      before += w < warp ? c : 0;
      total += c;
    }
    if (eq) {
      const long long pos = s_eq_base + before + __popc(ballot & ((1u << lane) - 1u));
      if (pos < n_eq) {
        ov[n_gt + pos] = static_cast<scalar_t>(f);
        oi[n_gt + pos] = i;
      }
    }
    __syncthreads();
    // Thread 0 decides while no thread can be adding to s_gt_count or reading
    // s_eq_base / warp_counts; every thread reads the flag after the barrier,
    // and it is written again only after two more barriers, so the whole
    // block leaves the loop together.
    if (tid == 0) {
      s_eq_base += total;
      s_done = s_eq_base >= n_eq && s_gt_count >= static_cast<unsigned long long>(n_gt);
    }
    __syncthreads();
    if (s_done) break;
  }

  // --- sort the k winners by (value desc, index asc): bitonic in shared memory
  if (k > kMaxBlockSort) return;
  int P = 1;
  while (P < k) P <<= 1;
  for (int j = tid; j < P; j += kSelectThreads) {
    if (j < k) {
      sort_v[j] = static_cast<float>(ov[j]);
      sort_i[j] = static_cast<int>(oi[j]);
    } else {
      sort_v[j] = -1.f;  // below every ReLU output
      sort_i[j] = 0x7fffffff;
    }
  }
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < P / 2; t += kSelectThreads) {
        const int a = 2 * t - (t & (stride - 1));
        const int b = a + stride;
        const bool forward = (a & size) == 0;
        const bool b_first = ahead(sort_v[b], sort_i[b], sort_v[a], sort_i[a]);
        if (forward == b_first) {
          const float tv = sort_v[a];
          sort_v[a] = sort_v[b];
          sort_v[b] = tv;
          const int ti = sort_i[a];
          sort_i[a] = sort_i[b];
          sort_i[b] = ti;
        }
      }
      __syncthreads();
    }
  }
  for (int j = tid; j < k; j += kSelectThreads) {
    ov[j] = static_cast<scalar_t>(sort_v[j]);
    oi[j] = sort_i[j];
  }
}

// Rows per encoder block on the GPU: within the byte budget's `rows`, a
// multiple of the GEMM tile (128) and balanced, so no block is a thin tail
// (P: 2 x 2048 rows, not 2684 + 1412, in bf16; 4 x 1024, not 3 x 1342 + 70,
// in fp32, at the default budget of 256 MiB). Budgets under 128 rows are kept
// as they are.
inline int64_t gemm_block_rows(int64_t B, int64_t rows) {
  constexpr int64_t kTile = 128;
  if (rows >= B || rows < kTile) return rows;
  const int64_t tiled = rows / kTile * kTile;
  const int64_t blocks = ceil_div(B, tiled);
  return std::min(tiled, ceil_div(ceil_div(B, blocks), kTile) * kTile);
}

std::tuple<at::Tensor, at::Tensor> topk_encode_cuda(const at::Tensor& x,       // [B, d]
                                                    const at::Tensor& weight,  // [F, d]
                                                    const at::Tensor& bias,    // [F]
                                                    int64_t k,
                                                    const std::optional<at::Tensor>& pre_bias) {  // [d]
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = prepare_topk_encode(x, weight, bias, k, pre_bias);
  TORCH_CHECK_VALUE(a.F < (int64_t(1) << 31), "dualenc_fast: topk_encode on CUDA supports ",
                    "F < 2^31 features, got weight of shape ", weight.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "dualenc_fast: topk_encode on CUDA supports ",
                   "float32, float16 and bfloat16; argument 'x' is ", describe(x));
  const at::Tensor &xe = a.xe, &W = a.W, &b = a.b;
  at::Tensor &values = a.values, &indices = a.indices;
  const int64_t B = a.B, F = a.F;
  if (B == 0) return {values, indices};
  const int64_t rows =
      gemm_block_rows(B, encode_block_rows(B, F, xe.element_size(), sparse_strategy().encode_block_bytes));
  const auto Wt = W.t();
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t nr = std::min(rows, B - r0);
    const auto z = at::addmm(b, xe.narrow(0, r0, nr), Wt).contiguous();  // [nr, F]
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xe.scalar_type(), "topk_encode_cuda", [&] {
      DUALENC_LAUNCH(topk_select_kernel<scalar_t>, checked_grid(nr, "topk_select_kernel"), kSelectThreads, 0, stream)(
          z.const_data_ptr<scalar_t>(), values.mutable_data_ptr<scalar_t>() + r0 * k,
          indices.mutable_data_ptr<int64_t>() + r0 * k, F, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (k > kMaxBlockSort) {
    // order by index, then stably by value: (value desc, index asc)
    auto by_index = at::sort(indices, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    auto v = at::gather(values, 1, std::get<1>(by_index));
    auto by_value = at::sort(v, /*stable=*/true, /*dim=*/1, /*descending=*/true);
    values = std::get<0>(by_value);
    indices = at::gather(std::get<0>(by_index), 1, std::get<1>(by_value));
  }
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cuda(
    const at::Tensor& grad_values,  // [B, k]
    const at::Tensor& values,       // [B, k]
    const at::Tensor& indices,      // [B, k] int64
    const at::Tensor& x,            // [B, d]
    const at::Tensor& weight,       // [F, d]
    const std::optional<at::Tensor>& pre_bias,  // [d] or None
    bool need_x_grad, bool need_weight_grad, bool check_indices, int64_t sparse_form) {
  const c10::cuda::CUDAGuard guard(values.device());
  return topk_encode_backward_impl<Prims>(grad_values, values, indices, x, weight, pre_bias, need_x_grad,
                                          need_weight_grad, check_indices, sparse_form);
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("topk_encode", &dualenc_fast::cuda::topk_encode_cuda);
  m.impl("topk_encode_backward", &dualenc_fast::cuda::topk_encode_backward_cuda);
}
