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
// elements over F features, or 0 for the row-block form (setting 0).
int64_t dense_dv_chunk(int64_t B, int64_t F, int64_t elt);

SparseStrategy& sparse_strategy();

// Whether an op over a [B, k] code of F features should take the dense path:
// on the CPU or not, with a 16-bit dtype, or float32 (TF32 read from ATen).
bool use_dense_path(bool on_cpu, bool half_or_bf16, bool is_float32, int64_t B, int64_t k, int64_t F);
// The same for a code held in `like` ([B, k]).
bool use_dense_path(const at::Tensor& like, int64_t k, int64_t F);

// The form of a sparse product as one integer, so that a forward can record
// it and its backward use the very same (the strategy is process-wide and may
// change in between): 0 = gather, n > 0 = dense in row blocks of about n bytes.
int64_t sparse_form(bool on_cpu, bool half_or_bf16, bool is_float32, int64_t B, int64_t k, int64_t F);
// A backward op's `sparse_form` argument: the recorded form (>= 0) as is, or,
// for -1, the form the current strategy picks for a code held in `like`.
// Anything else raises naming the argument.
int64_t resolve_sparse_form(int64_t recorded, const at::Tensor& like, int64_t k, int64_t F);

}  // namespace dualenc_fast
