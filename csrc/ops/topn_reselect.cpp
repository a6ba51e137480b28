// Schema: topn_reselect — keep the n largest of each row's k active values
// (the NFM's re-selection), under the package tie rule (value descending,
// then feature index ascending). Also returns `positions` [B, n] int64, the
// column in the input each kept entry came from (the backward scatters
// through it).
#include "ops/topn_reselect.h"

#include <torch/library.h>

#include "checks.h"

namespace dualenc_fast {

void check_topn_reselect_args(const at::Tensor& values, const at::Tensor& indices, int64_t n) {
  check_sparse_code(values, indices);
  TORCH_CHECK_VALUE(n > 0 && n <= values.size(1), "dualenc_fast: argument 'n' must satisfy ",
                    "0 < n <= k = ", values.size(1), ", got n = ", n);
}

}  // namespace dualenc_fast

TORCH_LIBRARY_FRAGMENT(dualenc_fast, m) {
  m.def("topn_reselect(Tensor values, Tensor indices, int n) -> (Tensor, Tensor, Tensor)");
}
