// The dualenc_fast._C_emu module shell: the CUDA kernels compiled for the CPU
// emulator register their ops under torch.ops.dualenc_fast_emu (CPU key);
// pybind11 carries the settings (the emulated build's own copies of the sparse
// strategy and index checks) and the emulator's schedule seed and self-tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "checks.h"
#include "csr_share.h"
#include "emu/emu.h"
#include "strategy.h"

namespace py = pybind11;

namespace dualenc_fast::emu_selftest {
std::vector<int64_t> run(const std::string& name);
}

namespace {

py::dict sparse_strategy() {
  const auto& s = dualenc_fast::sparse_strategy();
  py::dict d;
  const char* names[] = {"auto", "gather", "dense"};
  d["mode"] = names[static_cast<int>(s.mode)];
  d["cpu_min_density"] = s.cpu_min_density;
  d["cuda_min_density"] = s.cuda_min_density;
  d["cuda_fp32_min_density"] = s.cuda_fp32_min_density;
  d["dense_block_bytes"] = s.dense_block_bytes;
  d["encode_block_bytes"] = s.encode_block_bytes;
  const char* tiled[] = {"auto", "on", "off"};
  d["tiled"] = tiled[static_cast<int>(s.tiled)];
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_emu, m) {
  m.doc() = "dualenc_fast's CUDA kernels run on the CPU by an emulator (ops under torch.ops.dualenc_fast_emu)";
#if defined(EMU_ASAN)
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
  m.def("set_schedule_seed", &emu::set_schedule_seed, py::arg("seed"),
        "0: threads and blocks in order; n > 0: a random schedule drawn from n (also EMU_SEED=n).");
  m.def("schedule_seed", &emu::schedule_seed);
  m.def("launch_count", &emu::launch_count, "Kernel launches since the seed was last set.");
  m.def("selftest", &dualenc_fast::emu_selftest::run, py::arg("name"));
  m.def(
      "set_index_checks", [](bool on) { dualenc_fast::index_checks_enabled() = on; });
  m.def("sparse_strategy", &sparse_strategy);
  m.def("dense_dv_block_bytes", []() { return dualenc_fast::sparse_strategy().dense_dv_block_bytes; });
  m.def("set_dense_dv_block_bytes", [](int64_t n) { dualenc_fast::sparse_strategy().dense_dv_block_bytes = n; });
  m.def("dense_weight_grads_staged", []() { return dualenc_fast::sparse_strategy().dense_wgrad_staged; });
  m.def("set_dense_weight_grads_staged", [](bool on) { dualenc_fast::sparse_strategy().dense_wgrad_staged = on; });
  m.def("staged_smem_bytes", []() { return dualenc_fast::sparse_strategy().staged_smem_bytes; });
  m.def("set_staged_smem_bytes", [](int64_t n) { dualenc_fast::sparse_strategy().staged_smem_bytes = n; });
  m.def("set_share_csrs", &dualenc_fast::set_share_csrs, py::arg("on"),
        "Whether the backward products of one code share one transpose of it (csr_share.h).");
  m.def("share_csrs", &dualenc_fast::share_csrs);
  m.def("clear_shared_csrs", &dualenc_fast::clear_shared_csrs, "Drop every kept transpose and mark.");
  m.def("shared_csr_stats", &dualenc_fast::shared_csr_stats, py::arg("reset") = false,
        "(transposes built, transposes reused) since the last reset.");
  // Validated in Python (dualenc_fast.emu).
  m.def("set_sparse_strategy", [](int mode, int64_t dense_block_bytes, int64_t encode_block_bytes, int tiled) {
    auto& s = dualenc_fast::sparse_strategy();
    s.tiled = static_cast<dualenc_fast::TiledMode>(tiled);
    s.mode = static_cast<dualenc_fast::SparseMode>(mode);
    s.dense_block_bytes = dense_block_bytes;
    s.encode_block_bytes = encode_block_bytes;
  }, py::arg("mode"), py::arg("dense_block_bytes"), py::arg("encode_block_bytes"),
     py::arg("tiled"));
}
