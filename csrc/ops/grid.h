// Checked grid sizes for CUDA launches. Host-only C++ (no CUDA headers), so
// the CPU build carries it too and tests reach it from Python
// (_C._checked_grid).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace dualenc_fast {

// CUDA's limit on gridDim.x (every kernel here uses a 1-D grid).
constexpr int64_t kMaxGridBlocks = (int64_t{1} << 31) - 1;

// `blocks` as a launch's gridDim.x, or a ValueError naming `kernel` and the
// size when it is outside [1, 2^31 - 1] (a silent cast would wrap it).
inline unsigned checked_grid(int64_t blocks, const char* kernel) {
  TORCH_CHECK_VALUE(blocks >= 1 && blocks <= kMaxGridBlocks, "dualenc_fast: kernel ", kernel,
                    " needs a grid of ", blocks, " blocks; CUDA allows 1 to 2^31 - 1 = ", kMaxGridBlocks,
                    " (gridDim.x): split the input into smaller batches");
  return static_cast<unsigned>(blocks);
}

}  // namespace dualenc_fast
