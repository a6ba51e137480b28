// Checked grid sizes for CUDA launches. Host-only C++ (no CUDA headers), so
// the CPU build carries it too and tests reach it from Python
// (_C._checked_grid).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace dualenc_fast {

// CUDA's limit on gridDim.x.
constexpr int64_t kMaxGridBlocks = (int64_t{1} << 31) - 1;

// `blocks` as a launch's gridDim.x, or a ValueError naming `kernel` and the
// size when it is outside [1, 2^31 - 1] (a silent cast would wrap it).
inline unsigned checked_grid(int64_t blocks, const char* kernel) {
  TORCH_CHECK_VALUE(blocks >= 1 && blocks <= kMaxGridBlocks, "dualenc_fast: kernel ", kernel,
                    " needs a grid of ", blocks, " blocks; CUDA allows 1 to 2^31 - 1 = ", kMaxGridBlocks,
                    " (gridDim.x): split the input into smaller batches");
  return static_cast<unsigned>(blocks);
}

// CUDA's limit on gridDim.y and gridDim.z.
constexpr int64_t kMaxGridBlocksYZ = 65535;

// `blocks` as a launch's gridDim.y (or z), checked as checked_grid does.
inline unsigned checked_grid_y(int64_t blocks, const char* kernel) {
  TORCH_CHECK_VALUE(blocks >= 1 && blocks <= kMaxGridBlocksYZ, "dualenc_fast: kernel ", kernel,
                    " needs ", blocks, " blocks along gridDim.y; CUDA allows 1 to ", kMaxGridBlocksYZ,
                    " there: the rows are too wide for this kernel");
  return static_cast<unsigned>(blocks);
}

}  // namespace dualenc_fast
