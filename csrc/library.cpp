// Declares the dualenc_fast op namespace. Each op's schema is defined in its
// own file in csrc/ops/ (TORCH_LIBRARY_FRAGMENT); kernels register per device
// in csrc/ops/cpu and csrc/ops/cuda.
#include <torch/library.h>

TORCH_LIBRARY(dualenc_fast, m) {
  // Fake (meta) implementations and autograd live in this Python module.
  m.set_python_module("dualenc_fast.ops");
}
