// How the sparse ops do their sparse-times-dense products: a per-row gather
// (O(B*k*d) work, memory-bound) or a dense GEMM on the scattered code
// (O(B*F*d) work on the GEMM units). KERNELS.md, "Density decides gather vs
// dense": the dense form wins once the density k/F is high enough for the
// device and dtype. "auto" compares k/F with a per-device threshold; "gather"
// and "dense" force one path. Set from Python (dualenc_fast.ops.set_sparse_strategy).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dualenc_fast {

enum class SparseMode : int { Auto = 0, Gather = 1, Dense = 2 };

// The batch-tiled forward of sparse_decode on CUDA (ops/cuda/tiled_decode_cuda.cu):
// "auto" takes it where the model below says so (and only in SparseMode::Auto),
// "on" forces it, "off" never takes it. It is a forward-only form: the form a
// forward records for its backward (sparse_form) stays gather or dense.
enum class TiledMode : int { Auto = 0, On = 1, Off = 2 };

// Batch rows per block of the tiled forward: each block streams the weight
// table's rows for its column slice through shared memory once per tile.
constexpr int64_t kTiledRows = 256;
// Fewest features per weight chunk it streams (float32 and float64; 192 in
// 16-bit): it keeps one int32 pair offset per (row, chunk).
constexpr int64_t kTiledMinChunk = 96;

struct SparseStrategy {
  SparseMode mode = SparseMode::Auto;
  // Lowest density k/F at which "auto" takes the dense path.
  // CPU: measured on the 2-core development machine (bench/results/), where the
  // dense GEMM overtakes the gather between 6% and 12.5%.
  double cpu_min_density = 0.10;
  // CUDA, 16-bit dtypes or float32 with TF32 GEMMs allowed: tensor-core GEMMs.
  double cuda_min_density = 0.01;
  // CUDA, float32 without TF32 (and float64): GEMMs on the SIMT units.
  double cuda_fp32_min_density = 0.05;
  // The dense path works through the batch in row blocks whose dense [rows, F]
  // code stays near this size (at least one row).
  int64_t dense_block_bytes = int64_t{256} << 20;
  // topk_encode on CUDA runs its encoder GEMM in row blocks whose [rows, F]
  // pre-activations stay near this size (at least one row). Set from Python
  // (dualenc_fast.ops.set_encode_block_bytes).
  int64_t encode_block_bytes = int64_t{256} << 20;
  // The dense form's dvalues (sparse_decode backward): the product g W^T in
  // chunks of features whose [B, chunk] result stays near this size (at least
  // kMinDvChunk features), each read back through the code's transpose while
  // it is still in cache, so no [rows, F] product goes to memory; 0: in the row
  // blocks above, each [rows, F] product gathered row by row. Set from Python
  // (dualenc_fast.ops.set_dense_dv_block_bytes).
  int64_t dense_dv_block_bytes = int64_t{24} << 20;

  // The tiled forward (CUDA only). Model, per output column and table, at the
  // paper's shape P (B = 4096, d = 3200, F = 50000, k = 1024; H100 figures of
  // KERNELS.md and the review: L2 -> SM 5.5-7 TB/s, shared memory ~30 TB/s,
  // 927 G warp-instructions/s):
  // - the gather form reads B*k*d weight elements, random rows from L2/HBM
  //   (bfloat16 at P: 26.8 GB, ~10 ms);
  // - the tiled form reads (B/R)*F*d elements from L2 into shared memory
  //   (R = min(B, kTiledRows) rows share each staged element; P, bf16: 5.1 GB,
  //   0.7-0.9 ms), then B*k*d from shared memory, and issues 14.75 sm_90
  //   instructions per (pair, warp slice of 128 columns) plus ~15 per (row,
  //   feature chunk, slice): ~1.95 G warp-instructions at P, ~2 ms, the bound
  //   (float32 about the same); the review's byte estimate is 0.75-1 ms.
  // So per pair and column the tiled form costs about 1/(u * 6 TB/s) of L2
  // bytes plus its fixed shared-memory/issue part, with u = k*R/F the pairs
  // served by each staged element, against ~1/(2.7 TB/s) for the gather:
  // the bytes break even near u = 0.6, and the per-(row, chunk) overhead
  // (F/(C*k) chunks per pair, C = 96-192 features per chunk) doubles the
  // issue time at u = 1. "auto" takes the tiled form from u >= tiled_min_reuse
  // (2: twice the point where the chunk overhead matches the pair work).
  double tiled_min_reuse = 2.0;
  // Against the dense GEMM, whose time does not depend on k: the tiled form
  // scales with k, the GEMM with F. 16-bit (and TF32) tensor-core GEMMs take
  // 1.64-2.0 ms at P (k/F = 0.0205) against 0.75-1 ms (the review's bytes) to
  // ~2 ms (the instruction count) for the tiled form, so the crossover is
  // near k/F = 0.02-0.04. 0.02 is taken: at P itself the instruction count
  // makes it a toss-up, so P in 16-bit keeps today's dense GEMM until a GPU
  // run measures both (bench --ab tiled_forward_on). SIMT float32 GEMMs take
  // 22-26 ms against ~2 ms, a crossover near k/F = 0.25. "auto" takes the
  // tiled form below these densities (the sweep stage of bench/gpu_check.sh
  // times the three forms at P over k to settle them).
  double tiled_max_density = 0.02;
  double tiled_fp32_max_density = 0.25;
  TiledMode tiled = TiledMode::Auto;
  // The dense form's weight gradients (code^T @ y of sparse_decode and
  // topk_encode backward, and topk_encode's bias gradient) on CUDA: false = the
  // GEMMs on the scattered code (BlockGradSum); true = staged_scatter_rows
  // (ops/cuda/staged_rows.cuh) over the code's shared transpose. The CPU always
  // takes the GEMMs. Set from Python (dualenc_fast.ops.set_dense_weight_grads).
  bool dense_wgrad_staged = false;
  // Shared-memory bytes per block for staged_scatter_rows (0: the device's
  // opt-in maximum); a batch whose staged slice does not fit falls back to the
  // feature-major kernel. Set by the emulator's tests to force that fallback.
  int64_t staged_smem_bytes = 0;
};

// Fewest features in a chunk of the dense dvalues product (narrower GEMMs
// lose efficiency).
constexpr int64_t kMinDvChunk = 2048;

// Features per chunk of the dense dvalues product for B rows of `elt`-byte
// elements over F features, or 0 for the row-block form (setting 0, or a
// batch so large that even kMinDvChunk features outgrow the dense form's row
// block of `block_bytes`).
int64_t dense_dv_chunk(int64_t B, int64_t F, int64_t elt, int64_t block_bytes);

SparseStrategy& sparse_strategy();

// Whether an op over a [B, k] code of F features should take the dense path:
// on the CPU or not, with a 16-bit dtype, or float32 (TF32 read from ATen).
bool use_dense_path(bool on_cpu, bool half_or_bf16, bool is_float32, int64_t B, int64_t k, int64_t F);
// The same for a code held in `like` ([B, k]).
bool use_dense_path(const at::Tensor& like, int64_t k, int64_t F);

// Whether sparse_decode's CUDA forward takes the tiled form for a [B, k] code
// of F features (false on the CPU; see SparseStrategy::tiled).
bool use_tiled_forward(bool on_cpu, bool half_or_bf16, bool is_float32, int64_t B, int64_t k, int64_t F);

// The form of a sparse product as one integer, so that a forward can record
// it and its backward use the very same (the strategy is process-wide and may
// change in between): 0 = gather, n > 0 = dense in row blocks of about n bytes.
int64_t sparse_form(bool on_cpu, bool half_or_bf16, bool is_float32, int64_t B, int64_t k, int64_t F);
// A backward op's `sparse_form` argument: the recorded form (>= 0) as is, or,
// for -1, the form the current strategy picks for a code held in `like`.
// Anything else raises naming the argument.
int64_t resolve_sparse_form(int64_t recorded, const at::Tensor& like, int64_t k, int64_t F);

}  // namespace dualenc_fast
