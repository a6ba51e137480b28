// The dualenc_fast._C module shell. Tensor ops are registered with the PyTorch
// dispatcher (TORCH_LIBRARY in csrc/ops/); pybind11 carries only non-tensor
// helpers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "checks.h"

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
}
