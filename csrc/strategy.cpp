#include "strategy.h"

#include <algorithm>

#include <ATen/Context.h>
#include <c10/util/Exception.h>


namespace dualenc_fast {

SparseStrategy& sparse_strategy() {
  static SparseStrategy s;
  return s;
}

bool use_dense_path(bool on_cpu, bool half_or_bf16, bool is_float32, int64_t B, int64_t k, int64_t F) {
  const SparseStrategy& s = sparse_strategy();
  if (s.mode != SparseMode::Auto) return s.mode == SparseMode::Dense;
  if (F <= 0 || B == 0) return false;
  const double density = static_cast<double>(k) / static_cast<double>(F);
  if (on_cpu) return density >= s.cpu_min_density;
  const bool tensor_cores = half_or_bf16 || (is_float32 && at::globalContext().allowTF32CuBLAS());
  return density >= (tensor_cores ? s.cuda_min_density : s.cuda_fp32_min_density);
}

bool use_tiled_forward(bool on_cpu, bool half_or_bf16, bool is_float32, int64_t B, int64_t k, int64_t F) {
  const SparseStrategy& s = sparse_strategy();
  if (on_cpu || s.tiled == TiledMode::Off) return false;
  if (s.tiled == TiledMode::On) return true;
  if (s.mode != SparseMode::Auto || F <= 0 || B == 0 || k == 0) return false;
  const double density = static_cast<double>(k) / static_cast<double>(F);
  const double reuse = density * static_cast<double>(std::min(B, kTiledRows));
  const bool tensor_cores = half_or_bf16 || (is_float32 && at::globalContext().allowTF32CuBLAS());
  // its per-(row, chunk) pair offsets (int32, plus the int64 chunk bounds they
  // are searched with) stay within the dense form's block size
  const int64_t chunks = F / kTiledMinChunk + 2;
  if (B > s.dense_block_bytes / (12 * chunks)) return false;
  return reuse >= s.tiled_min_reuse && density < (tensor_cores ? s.tiled_max_density : s.tiled_fp32_max_density);
}

bool use_dense_path(const at::Tensor& like, int64_t k, int64_t F) {
  const auto t = like.scalar_type();
  return use_dense_path(like.is_cpu(), t == at::kHalf || t == at::kBFloat16, t == at::kFloat, like.size(0), k,
                        F);
}

int64_t sparse_form(bool on_cpu, bool half_or_bf16, bool is_float32, int64_t B, int64_t k, int64_t F) {
  return use_dense_path(on_cpu, half_or_bf16, is_float32, B, k, F) ? sparse_strategy().dense_block_bytes : 0;
}

int64_t dense_dv_chunk(int64_t B, int64_t F, int64_t elt, int64_t block_bytes) {
  const int64_t bytes = sparse_strategy().dense_dv_block_bytes;
  if (bytes <= 0 || F <= 0) return 0;
  const int64_t per_feature = std::max<int64_t>(1, B * elt);
  // a chunk of the fewest features may not outgrow the row blocks' [rows, F]
  // bound (a batch that large keeps the row-block form)
  if (std::min(F, kMinDvChunk) > block_bytes / per_feature) return 0;
  return std::min<int64_t>(F, std::max<int64_t>(kMinDvChunk, bytes / per_feature));
}

int64_t resolve_sparse_form(int64_t recorded, const at::Tensor& like, int64_t k, int64_t F) {
  TORCH_CHECK_VALUE(recorded >= -1, "dualenc_fast: argument 'sparse_form' must be -1 (the current ",
                    "strategy), 0 (gather) or a dense block size in bytes > 0, got ", recorded);
  if (recorded >= 0) return recorded;
  return use_dense_path(like, k, F) ? sparse_strategy().dense_block_bytes : 0;
}

}  // namespace dualenc_fast
