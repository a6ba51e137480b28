// CPU kernel of dense_code: each row zeroed and its k entries added while the
// row is in cache, rows in parallel, into memory from the buffer cache (no page
// faults after the first step).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "buffer_cache.h"
#include "ops/cpu/primitives.h"
#include "ops/dense_code.h"

namespace dualenc_fast::cpu {
namespace {

at::Tensor dense_code_cpu(const at::Tensor& values, const at::Tensor& indices, int64_t num_features,
                          bool check_indices) {
  check_dense_code_args(values, indices, num_features, check_indices);
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const int64_t B = v.size(0), k = v.size(1), F = num_features;
  auto out = empty_cached({B, F}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "dense_code_cpu", [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(F / 8 + k), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* row = op + b * F;
        std::memset(static_cast<void*>(row), 0, static_cast<size_t>(F) * sizeof(scalar_t));
        for (int64_t j = 0; j < k; ++j) row[ip[b * k + j]] += vp[b * k + j];
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace dualenc_fast::cpu

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("dense_code", &dualenc_fast::cpu::dense_code_cpu);
}
