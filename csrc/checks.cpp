#include "checks.h"

#include <ATen/ops/aminmax.h>

#include <algorithm>

namespace dualenc_fast {

bool& index_checks_enabled() {
  static bool enabled = true;
  return enabled;
}

void check_index_range(const at::Tensor& indices, const char* name, int64_t num_rows,
                       const char* rows_name) {
  if (!index_checks_enabled() || indices.numel() == 0) return;
  int64_t lo = 0, hi = 0;
  if (indices.is_cpu()) {
    const auto idx = indices.contiguous();
    const int64_t* p = idx.const_data_ptr<int64_t>();
    lo = hi = p[0];
    for (int64_t i = 1, n = idx.numel(); i < n; ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
  } else {  // one reduction on the device and a sync to read it
    auto mm = at::aminmax(indices);
    lo = std::get<0>(mm).item<int64_t>();
    hi = std::get<1>(mm).item<int64_t>();
  }
  TORCH_CHECK_INDEX(lo >= 0 && hi < num_rows, "dualenc_fast: argument '", name,
                    "' must hold feature indices in [0, ", num_rows, ") (", rows_name,
                    "), got values in [", lo, ", ", hi, "]");
}

}  // namespace dualenc_fast
