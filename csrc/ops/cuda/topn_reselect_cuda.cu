// CUDA implementation of topn_reselect: two stable segmented sorts (by feature
// index, then by value descending) give the tie rule exactly; rows are short
// (k active values), so the sorts are cheap next to the encoder.
#include <ATen/core/Tensor.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csr_share.h"
#include "ops/topn_reselect.h"

namespace dualenc_fast::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topn_reselect_cuda(const at::Tensor& values,   // [B, k]
                                                                  const at::Tensor& indices,  // [B, k]
                                                                  int64_t n) {
  check_topn_reselect_args(values, indices, n);
  const c10::cuda::CUDAGuard guard(values.device());
  auto by_index = at::sort(indices, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const auto& pos_index = std::get<1>(by_index);
  auto v = at::gather(values, 1, pos_index);
  auto by_value = at::sort(v, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  auto order = std::get<1>(by_value).narrow(1, 0, n);
  auto out_v = std::get<0>(by_value).narrow(1, 0, n).contiguous();
  auto out_i = at::gather(std::get<0>(by_index), 1, order);
  auto out_p = at::gather(pos_index, 1, order);
  mark_shared_code(out_i);  // its backward products share one transpose (csr_share.h)
  return {out_v, out_i, out_p};
}

}  // namespace
}  // namespace dualenc_fast::cuda

TORCH_LIBRARY_IMPL(dualenc_fast, CUDA, m) {
  m.impl("topn_reselect", &dualenc_fast::cuda::topn_reselect_cuda);
}
