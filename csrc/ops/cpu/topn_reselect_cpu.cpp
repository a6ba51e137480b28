// CPU kernel of topn_reselect: a partial sort of each row's k positions.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "csr_share.h"
#include "ops/cpu/primitives.h"
#include "ops/topn_reselect.h"

namespace dualenc_fast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topn_reselect_cpu(const at::Tensor& values,   // [B, k]
                                                                 const at::Tensor& indices,  // [B, k]
                                                                 int64_t n) {
  check_topn_reselect_args(values, indices, n);
  const auto v = values.contiguous();
  const auto idx = indices.contiguous();
  const int64_t B = v.size(0), k = v.size(1);
  auto out_v = at::empty({B, n}, v.options());
  auto out_i = at::empty({B, n}, idx.options());
  auto out_p = at::empty({B, n}, idx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "topn_reselect_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* ov = out_v.mutable_data_ptr<scalar_t>();
    int64_t* oi = out_i.mutable_data_ptr<int64_t>();
    int64_t* op = out_p.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B, grain_for(k * 8), [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> pos(k);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* vb = vp + b * k;
        const int64_t* ib = ip + b * k;
        std::iota(pos.begin(), pos.end(), int64_t(0));
        std::partial_sort(pos.begin(), pos.begin() + n, pos.end(), [&](int64_t a, int64_t c) {
          const acc_t va = static_cast<acc_t>(vb[a]), vc = static_cast<acc_t>(vb[c]);
          return va > vc || (va == vc && ib[a] < ib[c]);
        });
        for (int64_t j = 0; j < n; ++j) {
          ov[b * n + j] = vb[pos[j]];
          oi[b * n + j] = ib[pos[j]];
          op[b * n + j] = pos[j];
        }
      }
    });
  });
  mark_shared_code(out_i);  // its backward products share one transpose (csr_share.h)
  return {out_v, out_i, out_p};
}

}  // namespace
}  // namespace dualenc_fast::cpu

TORCH_LIBRARY_IMPL(dualenc_fast, CPU, m) {
  m.impl("topn_reselect", &dualenc_fast::cpu::topn_reselect_cpu);
}
