// The dualenc_fast._C module shell. Tensor ops are registered with the PyTorch
// dispatcher (TORCH_LIBRARY in csrc/ops/); pybind11 carries only non-tensor
// helpers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "buffer_cache.h"
#include "checks.h"
#include "csr_share.h"
#include "ops/grid.h"
#include "strategy.h"

#ifndef DUALENC_VERSION
#define DUALENC_VERSION "unknown"
#endif
#ifndef DUALENC_TORCH_VERSION
#define DUALENC_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

namespace {

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

py::dict sparse_strategy() {
  const auto& s = dualenc_fast::sparse_strategy();
  py::dict d;
  const char* names[] = {"auto", "gather", "dense"};
  d["mode"] = names[static_cast<int>(s.mode)];
  d["cpu_min_density"] = s.cpu_min_density;
  d["cuda_min_density"] = s.cuda_min_density;
  d["cuda_fp32_min_density"] = s.cuda_fp32_min_density;
  d["dense_block_bytes"] = s.dense_block_bytes;
  const char* tiled[] = {"auto", "on", "off"};
  d["tiled"] = tiled[static_cast<int>(s.tiled)];
  d["tiled_min_reuse"] = s.tiled_min_reuse;
  d["tiled_max_density"] = s.tiled_max_density;
  d["tiled_fp32_max_density"] = s.tiled_fp32_max_density;
  return d;
}

// Validated in Python (dualenc_fast.ops.set_sparse_strategy).
void set_sparse_strategy(int mode, double cpu, double cuda, double cuda_fp32, int64_t block_bytes, int tiled,
                         double tiled_min_reuse, double tiled_max_density, double tiled_fp32_max_density) {
  auto& s = dualenc_fast::sparse_strategy();
  s.tiled = static_cast<dualenc_fast::TiledMode>(tiled);
  s.tiled_min_reuse = tiled_min_reuse;
  s.tiled_max_density = tiled_max_density;
  s.tiled_fp32_max_density = tiled_fp32_max_density;
  s.mode = static_cast<dualenc_fast::SparseMode>(mode);
  s.cpu_min_density = cpu;
  s.cuda_min_density = cuda;
  s.cuda_fp32_min_density = cuda_fp32;
  s.dense_block_bytes = block_bytes;
}

py::dict build_info() {
  py::dict d;
  d["version"] = DUALENC_VERSION;
  d["torch_built_against"] = DUALENC_TORCH_VERSION;
#ifdef DUALENC_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_version"] = DUALENC_CUDA_VERSION;
  d["cuda_architectures"] = split_archs(DUALENC_CUDA_ARCHS);
#else
  d["cuda_compiled"] = false;
  d["cuda_version"] = py::none();
  d["cuda_architectures"] = std::vector<std::string>{};
#endif
  d["cxx_standard"] = static_cast<long>(__cplusplus);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dualenc_fast compiled kernels (ops live under torch.ops.dualenc_fast)";
  m.def("build_info", &build_info, "What this extension was compiled with.");
  m.def(
      "set_index_checks", [](bool on) { dualenc_fast::index_checks_enabled() = on; },
      "Enable or disable the index range checks of the sparse ops.");
  m.def("index_checks", []() { return dualenc_fast::index_checks_enabled(); });
  m.def("sparse_strategy", &sparse_strategy, "The gather-or-dense choice of the sparse products.");
  m.def("use_dense_path",
        py::overload_cast<bool, bool, bool, int64_t, int64_t, int64_t>(&dualenc_fast::use_dense_path),
        py::arg("on_cpu"), py::arg("half_or_bf16"), py::arg("is_float32"), py::arg("B"), py::arg("k"),
        py::arg("F"), "Whether the sparse ops would take the dense path for such a code.");
  m.def("use_tiled_forward", &dualenc_fast::use_tiled_forward, py::arg("on_cpu"), py::arg("half_or_bf16"),
        py::arg("is_float32"), py::arg("B"), py::arg("k"), py::arg("F"),
        "Whether sparse_decode's forward would take the batch-tiled CUDA form for such a code.");
  m.def("sparse_form",
        &dualenc_fast::sparse_form,
        py::arg("on_cpu"), py::arg("half_or_bf16"), py::arg("is_float32"), py::arg("B"), py::arg("k"),
        py::arg("F"), "The form a forward records for its backward: 0 gather, n > 0 dense in n-byte blocks.");
  m.def("_checked_grid", &dualenc_fast::checked_grid, py::arg("blocks"), py::arg("kernel"),
        "The checked grid size of a CUDA launch (tests reach the host-side check through it).");
  m.def("_checked_grid_y", &dualenc_fast::checked_grid_y, py::arg("blocks"), py::arg("kernel"),
        "The checked gridDim.y of a 2-D CUDA launch.");
  m.def("buffer_cache_limit", &dualenc_fast::buffer_cache_limit, "Most idle bytes the CPU buffer cache keeps.");
  m.def("set_buffer_cache_limit", &dualenc_fast::set_buffer_cache_limit, py::arg("max_bytes"));
  m.def("buffer_cache_bytes", &dualenc_fast::buffer_cache_bytes, "Idle bytes in the CPU buffer cache now.");
  m.def("clear_buffer_cache", &dualenc_fast::clear_buffer_cache, "Free every idle block of the CPU buffer cache.");
  m.def("set_share_csrs", &dualenc_fast::set_share_csrs, py::arg("on"),
        "Whether the backward products of one code share one transpose of it (csr_share.h).");
  m.def("share_csrs", &dualenc_fast::share_csrs);
  m.def("clear_shared_csrs", &dualenc_fast::clear_shared_csrs, "Drop every kept transpose and mark.");
  m.def("shared_csr_stats", &dualenc_fast::shared_csr_stats, py::arg("reset") = false,
        "(transposes built, transposes reused) since the last reset.");
  m.def("set_sparse_strategy", &set_sparse_strategy, py::arg("mode"), py::arg("cpu_min_density"),
        py::arg("cuda_min_density"), py::arg("cuda_fp32_min_density"), py::arg("dense_block_bytes"),
        py::arg("tiled"), py::arg("tiled_min_reuse"), py::arg("tiled_max_density"),
        py::arg("tiled_fp32_max_density"));
  // Validated in Python (dualenc_fast.ops.set_encode_block_bytes).
  m.def("encode_block_bytes", []() { return dualenc_fast::sparse_strategy().encode_block_bytes; });
  m.def("set_encode_block_bytes", [](int64_t n) { dualenc_fast::sparse_strategy().encode_block_bytes = n; });
  m.def("dense_dv_block_bytes", []() { return dualenc_fast::sparse_strategy().dense_dv_block_bytes; });
  m.def("set_dense_dv_block_bytes", [](int64_t n) { dualenc_fast::sparse_strategy().dense_dv_block_bytes = n; });
  // Validated in Python (dualenc_fast.ops.set_dense_weight_grads).
  m.def("dense_weight_grads_staged", []() { return dualenc_fast::sparse_strategy().dense_wgrad_staged; });
  m.def("set_dense_weight_grads_staged", [](bool on) { dualenc_fast::sparse_strategy().dense_wgrad_staged = on; });
}
