// CUDA kernels of topk_encode: the encoder GEMM (cuBLAS through at::addmm) in
// row blocks, then one thread block per row selects the row's top k of
// ReLU(z) (topk_select_kernel) and sorts them in shared memory. The backward
// is the sparse primitives only (its dx in the gather form through the tiled
// sparse_decode kernel where use_tiled_forward takes it).
//
// The select: a radix select in the style of "AIR top-k" (RAFT / cuVS
// select_k), on a 31 + nb bit key per element, unique within a row:
//   K = (vkey << nb) | (F - 1 - index),  nb = bit width of F - 1,
//   vkey = 0 for a zero (every ReLU'd value <= 0, -0.0 included), else
//          u + 2^20, u = the bits of the ReLU'd float (non-negative floats
//          order like their bit patterns; NaN is one canonical 0x7fc00000,
//          above +Inf's 0x7f800000, so it ranks first, as in torch.topk).
// The k largest keys are the k largest values, ties to the lowest index: the
// package rule, exactly. The digits, from the top: 11 bits (vkey >> 20: 0
// exactly for zeros, so a row with fewer than k positive values resolves its
// zeros without looking at the 20 value bits below), 10, 10, then the index
// key in digits of up to 11 bits; the select stops as soon as every key
// still in play is wanted.
//   Pass 1 reads z once: a 2048-bucket shared histogram of the top digit,
//     then a block scan from the top picks the bucket holding the k-th key.
//   Pass 2 reads z again: keys above that bucket are winners, written at
//     once; keys in it are candidates, staged in shared memory (a pool of
//     kPool entries shared with the winners of the in-block sort). The lower
//     digits are then resolved over the staged candidates only, and the
//     winners among them written.
//   When the candidates do not fit (tie-heavy rows: a constant row puts all F
//     elements in one bucket; rows with many zeros and fewer than k positive
//     values), each further digit pass reads z again, filtered by the digits
//     chosen so far, until the keys in play fit the pool or are all wanted;
//     then the pass 2 above. At most 3 + ceil(nb / 11) + 1 reads of z (6 at
//     F = 50000; the index digits are rarely all needed), where the radix
//     select before this design took 4-5 in every row.
// Cost per row where the candidate bucket fits the pool: 2 reads of z (100 KB
// each at F = 50000 in bf16), against 4-5 reads with one scalar load in
// flight per thread before. The reads are 16-byte loads (8 bf16/fp16 or 4
// fp32 values; a scalar head up to the row's first 16-byte boundary, for rows
// of odd F, and a scalar tail), kUnroll of them in flight per thread; no
// barrier inside a read (the old gather took 4 per 256 elements), 4 per
// digit pass plus the bitonic sort's. At the paper's shape (F = 50000,
// k = 1024, B = 4096, bf16) z is 0.41 GB: about 0.8 GB read, where the old
// select read 1.6-2.0 GB, i.e. 0.3-0.34 ms at 2.4-2.8 TB/s; the hot loop is
// about 20 instructions per element (sm_90 SASS), about 0.28 ms of issue for
// the two reads, so both bounds sit near 0.3 ms (estimates, not measured).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include "checks.h"
#include "csr_share.h"
#include "ops/cuda/primitives.cuh"
#include "ops/cuda/tiled_decode.h"
#include "ops/sparse_impl.h"
#include "ops/topk_encode.h"
#include "strategy.h"

namespace dualenc_fast::cuda {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / kWarp;
constexpr int kMaxBlockSort = 2048;  // rows with k above this are sorted by at::sort
constexpr int kDigitBits = 11;       // the widest digit: the histogram's 2048 buckets
constexpr int kBuckets = 1 << kDigitBits;
// Shared (value bits, index) entries: the winners of a row sorted in the block
// ([0, k) for k <= kMaxBlockSort) and, after them, the staged candidates, so
// at least kPool - kMaxBlockSort = 2048 candidates fit (4096 for larger k).
// With the histogram: 8 + 32 KiB of static shared memory.
constexpr int kPool = 4096;
// 16-byte loads in flight per thread in a read of z: with 5 blocks of 256
// threads per SM (sm_90: 48 registers and 41 KB of shared memory a block),
// 40 KiB in flight per SM, above the ~18 KiB that 3 TB/s x ~800 ns of latency
// asks of each of 132 SMs; more would only grow the unrolled code.
constexpr int kUnroll = 2;
static_assert(kPool >= 2 * kMaxBlockSort, "the pool holds the sorted winners and at least as many candidates");
static_assert(kBuckets % kSelectThreads == 0, "each thread scans the same number of buckets");

// ReLU for the select. A NaN stays NaN, as one canonical NaN (bits 0x7fc00000:
// above +Inf's 0x7f800000, so it ranks first, as in torch.topk, and NaNs tie
// among themselves, lowest index first); the loss then goes NaN.
template <typename scalar_t>
__device__ __forceinline__ float relu_value(scalar_t raw) {
  const float f = static_cast<float>(raw);
  if (f != f) return __uint_as_float(0x7fc00000u);
  return f > 0.f ? f : 0.f;
}

template <typename scalar_t>
__device__ __forceinline__ unsigned int relu_bits(scalar_t raw) {
  return __float_as_uint(relu_value(raw));
}

// The value part of the select key: 0 for a zero, u + 2^20 otherwise (at most
// 0x7fd00000), so that its top 11 bits are 0 exactly for zeros.
__device__ __forceinline__ unsigned int value_key(unsigned int u) { return u == 0u ? 0u : u + (1u << 20); }

// The index part: larger for a lower index, so ties go to the lowest index.
__device__ __forceinline__ unsigned int index_key(int64_t F, int64_t i) { return static_cast<unsigned int>(F - 1 - i); }

// For the key K = (vkey << nb) | ikey (31 + nb bits): the digit of K at bits
// [npos, npos + w) when K's bits above it equal `prefix` (the key is in play),
// else -1. 32-bit arithmetic while the digit lies in the value part (npos >=
// nb; prefix < 2^31 there): the hot passes over z.
__device__ __forceinline__ int key_digit(unsigned int vkey, unsigned int ikey, int nb, int npos, int w,
                                         unsigned long long prefix) {
  const unsigned int mask = (1u << w) - 1u;
  if (npos >= nb) {
    const unsigned int t = vkey >> (npos - nb);
    return (t >> w) == static_cast<unsigned int>(prefix) ? static_cast<int>(t & mask) : -1;
  }
  const unsigned long long t = ((static_cast<unsigned long long>(vkey) << nb) | ikey) >> npos;
  return (t >> w) == prefix ? static_cast<int>(static_cast<unsigned int>(t) & mask) : -1;
}

// The sign of (K >> pos) - prefix, 0 <= pos <= 31 + nb (32-bit while pos >= nb).
__device__ __forceinline__ int key_cmp(unsigned int vkey, unsigned int ikey, int nb, int pos,
                                       unsigned long long prefix) {
  if (pos >= nb) {
    const unsigned int t = vkey >> (pos - nb), p = static_cast<unsigned int>(prefix);
    return (t > p) - (t < p);
  }
  const unsigned long long t = ((static_cast<unsigned long long>(vkey) << nb) | ikey) >> pos;
  return (t > prefix) - (t < prefix);
}

// fn(u, i) for every element i of the row zr [F], with u its ReLU'd bits; each
// thread sees its own subset. The body is read with 16-byte loads from the
// first 16-byte boundary (z's rows start anywhere when F * sizeof(scalar_t)
// is not a multiple of 16), kUnroll of them in flight per thread; the head
// before that boundary and the tail after the last whole vector (fewer than
// 16 / sizeof(scalar_t) elements each) are read one element per thread.
template <typename scalar_t, typename Fn>
__device__ __forceinline__ void for_each_value(const scalar_t* __restrict__ zr, int64_t F, Fn&& fn) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int tid = threadIdx.x;
  const auto addr = reinterpret_cast<uintptr_t>(zr);
  int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(scalar_t));
  head = head < F ? head : F;
  const int64_t nvec = (F - head) / V;
  const int64_t tail = head + nvec * V;
  if (tid < head) fn(relu_bits(zr[tid]), static_cast<int64_t>(tid));
  if (tail + tid < F) fn(relu_bits(zr[tail + tid]), tail + tid);
  const uint4* __restrict__ vz = reinterpret_cast<const uint4*>(zr + head);
  auto visit = [&](const uint4& r, int64_t v) {
    scalar_t e[V];
    memcpy(e, &r, sizeof(r));
    const int64_t i0 = head + v * V;
#pragma unroll
    for (int j = 0; j < V; ++j) fn(relu_bits(e[j]), i0 + j);
  };
  int64_t v = tid;
  for (; v + (kUnroll - 1) * kSelectThreads < nvec; v += kUnroll * kSelectThreads) {
    uint4 r[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) r[j] = __ldg(vz + v + j * kSelectThreads);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) visit(r[j], v + j * kSelectThreads);
  }
  for (; v < nvec; v += kSelectThreads) visit(__ldg(vz + v), v);
}

struct Pick {
  unsigned int bucket, above, count;
};

// The bucket of hist [2^w] (w <= kDigitBits) holding the need-th largest key
// in play (1 <= need <= the histogram's total): `above` keys lie in higher
// buckets, above < need <= above + count. Thread t sums the buckets of ranks
// [t * per, (t + 1) * per) from the top; an inclusive scan in thread order
// (shuffles within each warp, then the warps' totals) finds the one thread
// whose range crosses need, which walks its buckets. Every thread gets the
// result.
__device__ __forceinline__ Pick pick_bucket(const unsigned int* hist,  // [2^w], shared
                                            int w, unsigned int need,
                                            unsigned int* warp_part,   // [kSelectWarps], shared
                                            unsigned int* s_pick) {    // [3], shared
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int nbk = 1 << w;
  const int per = nbk > kSelectThreads ? nbk / kSelectThreads : 1;
  const int r0 = tid * per;
  unsigned int own = 0;
  for (int j = 0; j < per; ++j) {
    if (r0 + j < nbk) own += hist[nbk - 1 - (r0 + j)];
  }
  unsigned int incl = own;
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const unsigned int up = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += up;
  }
  if (lane == kWarp - 1) warp_part[warp] = incl;
  __syncthreads();
  for (int q = 0; q < warp; ++q) incl += warp_part[q];
  unsigned int acc = incl - own;  // keys in the buckets above this thread's
  if (acc < need && need <= incl) {
    for (int j = 0; j < per; ++j) {
      const int b = nbk - 1 - (r0 + j);
      const unsigned int c = hist[b];
      if (acc + c >= need) {
        s_pick[0] = static_cast<unsigned int>(b);
        s_pick[1] = acc;
        s_pick[2] = c;
        break;
      }
      acc += c;
    }
  }
  __syncthreads();
  // s_pick and warp_part are written again only after two more barriers
  // (the next pass's), which every thread reaches after these reads
  return Pick{s_pick[0], s_pick[1], s_pick[2]};
}

// (value desc, index asc) on the value bits (NaN's canonical bits are the
// largest)
__device__ __forceinline__ bool ahead(unsigned int ua, int ia, unsigned int ub, int ib) {
  return ua > ub || (ua == ub && ia < ib);
}

// One block per row of z [rows, F]: writes the row's top-k, sorted when
// k <= kMaxBlockSort, to values/indices [rows, k]. See the top of this file.
template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads)
topk_select_kernel(const scalar_t* __restrict__ z,  // [rows, F]
                   scalar_t* __restrict__ out_v,     // [rows, k]
                   int64_t* __restrict__ out_i,      // [rows, k]
                   int64_t F, int64_t k) {
  __shared__ unsigned int hist[kBuckets];
  __shared__ unsigned int pool_u[kPool];  // value bits
  __shared__ int pool_i[kPool];           // feature index
  __shared__ unsigned int warp_part[kSelectWarps];
  __shared__ unsigned int s_pick[3];
  __shared__ unsigned int s_emitted;  // winners written so far
  __shared__ unsigned int s_staged;   // candidates staged so far

  const int tid = threadIdx.x, lane = tid % kWarp;
  const int64_t row = blockIdx.x;
  const scalar_t* zr = z + row * F;
  scalar_t* ov = out_v + row * k;
  int64_t* oi = out_i + row * k;
  const int nb = F > 1 ? 64 - __clzll(F - 1) : 0;  // bits of the index key
  const bool sort_here = k <= kMaxBlockSort;
  const int cand0 = sort_here ? static_cast<int>(k) : 0;  // the candidates' first pool entry
  const unsigned int cap = static_cast<unsigned int>(kPool - cand0);

  // A winner: in the pool for the in-block sort, else straight to the output
  // (at::sort orders it on the host). At most k + kPool shared atomics per
  // row in the common case (one per winner or candidate), so they are not
  // aggregated.
  auto emit = [&](unsigned int u, int64_t i) {
    const unsigned int slot = atomicAdd(&s_emitted, 1u);
    if (sort_here) {
      pool_u[slot] = u;
      pool_i[slot] = static_cast<int>(i);
    } else {
      ov[slot] = static_cast<scalar_t>(__uint_as_float(u));
      oi[slot] = i;
    }
  };

  // The select's state: the keys in play share K >> pos == prefix; `need`
  // of those `in_play` keys are wanted; the k - need keys with
  // K >> pos > prefix are winners. It ends when every key in play is wanted
  // (at pos == 0 a single key is in play: the keys are unique).
  int pos = 31 + nb;
  unsigned long long prefix = 0;
  unsigned int need = static_cast<unsigned int>(k), in_play = static_cast<unsigned int>(F);
  bool staged = false;        // the keys in play are among the pool's candidates, not read from z
  unsigned int n_staged = 0;  // candidates in the pool
  if (tid == 0) {
    s_emitted = 0;
    s_staged = 0;
  }
  __syncthreads();

  while (need != in_play && pos > 0) {
    // the next digit: 11, 10, 10 bits of the value key, then index-key bits
    const int vbits = pos - nb;
    const int w = vbits > 20 ? vbits - 20 : vbits > 10 ? vbits - 10 : vbits > 0 ? vbits
                                                                           : (pos < kDigitBits ? pos : kDigitBits);
    const int npos = pos - w;
    for (int b = tid; b < (1 << w); b += kSelectThreads) hist[b] = 0;
    __syncthreads();
    // Histogram of the keys in play. Shared atomics, with two kinds of
    // contention taken out first: digit 0 (in the first pass, the zeros that
    // ReLU makes of about half a row) is counted in a register and added once
    // per warp; other digits go through a one-entry run cache per thread
    // (a run of equal digits, as in tie-heavy rows where every element of a
    // thread's vector shares a bucket, costs one atomic). Elsewhere the
    // values near the k-th spread over many buckets, so per-warp
    // sub-histograms (8 x 8 KiB) would cost occupancy for little.
    unsigned int zeros = 0, run_d = 0, run_n = 0;
    auto count = [&](unsigned int vkey, unsigned int ikey) {
      const int digit = key_digit(vkey, ikey, nb, npos, w, prefix);
      if (digit < 0) return;
      const unsigned int d = static_cast<unsigned int>(digit);
      if (d == 0u) {
        ++zeros;
        return;
      }
      if (d != run_d) {
        if (run_n != 0u) atomicAdd(&hist[run_d], run_n);
        run_d = d;
        run_n = 0;
      }
      ++run_n;
    };
    if (staged) {
      for (unsigned int j = tid; j < n_staged; j += kSelectThreads) {
        count(value_key(pool_u[cand0 + j]), index_key(F, pool_i[cand0 + j]));
      }
    } else {
      for_each_value(zr, F, [&](unsigned int u, int64_t i) { count(value_key(u), index_key(F, i)); });
    }
    if (run_n != 0u) atomicAdd(&hist[run_d], run_n);
    zeros = warp_sum(zeros);
    if (lane == 0 && zeros != 0u) atomicAdd(&hist[0], zeros);
    __syncthreads();
    const Pick p = pick_bucket(hist, w, need, warp_part, s_pick);
    need -= p.above;
    in_play = p.count;
    prefix = (prefix << w) | p.bucket;
    pos = npos;
    // the zeros' bucket: their 20 value-key bits below are all 0
    if (pos - nb == 20 && prefix == 0) pos = nb;
    if (!staged && need != in_play && in_play <= cap) {
      // stage the keys in play (their order in the pool does not matter: the
      // key carries the index); the winners above them are written now
      for_each_value(zr, F, [&](unsigned int u, int64_t i) {
        const int c = key_cmp(value_key(u), index_key(F, i), nb, pos, prefix);
        if (c > 0) {
          emit(u, i);
        } else if (c == 0) {
          const unsigned int slot = atomicAdd(&s_staged, 1u);
          pool_u[cand0 + slot] = u;
          pool_i[cand0 + slot] = static_cast<int>(i);
        }
      });
      staged = true;
      n_staged = in_play;
      // no barrier: the loop goes on (need != in_play), and the next pass
      // reads the pool only after its first barrier
    }
  }

  // The remaining winners: K >> pos >= prefix, among the staged candidates
  // (the keys above them were written by the staging pass) or over z.
  if (staged) {
    for (unsigned int j = tid; j < n_staged; j += kSelectThreads) {
      const unsigned int u = pool_u[cand0 + j];
      const int i = pool_i[cand0 + j];
      if (key_cmp(value_key(u), index_key(F, i), nb, pos, prefix) >= 0) emit(u, i);
    }
  } else {
    for_each_value(zr, F, [&](unsigned int u, int64_t i) {
      if (key_cmp(value_key(u), index_key(F, i), nb, pos, prefix) >= 0) emit(u, i);
    });
  }

  // --- sort the k winners by (value desc, index asc): bitonic in shared memory
  if (!sort_here) return;
  int P = 1;
  while (P < k) P <<= 1;
  // Padding [k, P): below every winner. No barrier before it: winners go to
  // [0, k), and pool entry k + j (a candidate) was read above only by the
  // thread that pads it (j = tid mod kSelectThreads in both loops).
  for (int j = static_cast<int>(k) + tid; j < P; j += kSelectThreads) {
    pool_u[j] = 0u;
    pool_i[j] = INT_MAX;
  }
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < P / 2; t += kSelectThreads) {
        const int a = 2 * t - (t & (stride - 1));
        const int b = a + stride;
        const bool forward = (a & size) == 0;
        const bool b_first = ahead(pool_u[b], pool_i[b], pool_u[a], pool_i[a]);
        if (forward == b_first) {
          const unsigned int tu = pool_u[a];
          pool_u[a] = pool_u[b];
          pool_u[b] = tu;
          const int ti = pool_i[a];
          pool_i[a] = pool_i[b];
          pool_i[b] = ti;
        }
      }
      __syncthreads();
    }
  }
  for (int j = tid; j < k; j += kSelectThreads) {
    ov[j] = static_cast<scalar_t>(__uint_as_float(pool_u[j]));
    oi[j] = pool_i[j];
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
  mark_shared_code(indices);  // its backward products share one transpose (csr_share.h)
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
  check_topk_encode_backward_args(grad_values, values, indices, x, weight, pre_bias, check_indices);
  // dx = sum_j g[b, j] W[idx[b, j]] is the gather-sum of sparse_decode's
  // forward: in the gather form it takes the tiled kernel where that forward
  // would (the CUDA rule of use_tiled_forward); dW and db keep their form
  const int64_t B = values.size(0), k = values.size(1), F = weight.size(0);
  const auto t = values.scalar_type();
  const bool tiled = need_x_grad && resolve_sparse_form(sparse_form, values, k, F) == 0 &&
                     use_tiled_forward(/*on_cpu=*/false, t == at::kHalf || t == at::kBFloat16, t == at::kFloat, B,
                                       k, F);
  if (!tiled) {
    return topk_encode_backward_impl<Prims>(grad_values, values, indices, x, weight, pre_bias, need_x_grad,
                                            need_weight_grad, /*check_indices=*/false, sparse_form);
  }
  auto grads = topk_encode_backward_impl<Prims>(grad_values, values, indices, x, weight, pre_bias,
                                                /*need_x_grad=*/false, need_weight_grad, /*check_indices=*/false,
                                                sparse_form);
  // the same masked gradient as the impl's (threshold_backward)
  std::get<0>(grads) = tiled_decode(at::threshold_backward(grad_values, values, 0), indices, weight, std::nullopt);
  return grads;
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("topk_encode", &dualenc_fast::cuda::topk_encode_cuda);
  m.impl("topk_encode_backward", &dualenc_fast::cuda::topk_encode_backward_cuda);
}
