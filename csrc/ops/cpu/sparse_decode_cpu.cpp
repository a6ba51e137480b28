// CPU kernels of sparse_decode and its backward: the shared host code
// (ops/sparse_impl.h) on the CPU primitives (ops/cpu/primitives.h).
#include <torch/library.h>

#include "ops/cpu/primitives.h"
#include "ops/sparse_impl.h"

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("sparse_decode", &dualenc_fast::sparse_decode_impl<dualenc_fast::cpu::Prims>);
  m.impl("sparse_decode_backward", &dualenc_fast::sparse_decode_backward_impl<dualenc_fast::cpu::Prims>);
}
