// Input checks shared by every op. Each message names the argument and prints
// what was received, so a bad call is fixed from the error alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace dualenc_fast {

inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::string s = "a tensor of shape " + c10::str(t.sizes()) + ", dtype " +
                  std::string(c10::toString(t.scalar_type())) + " on " + t.device().str();
  return s;
}

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "dualenc_fast: argument '", name, "' must be a tensor, got None");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.dim() == dim, "dualenc_fast: argument '", name, "' must have shape ", shape,
                    " (", dim, " dims), got ", describe(t));
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "dualenc_fast: argument '", name, "' dim ", dim,
                    " must equal ", what, " = ", expected, ", got ", describe(t));
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   "dualenc_fast: argument '", name, "' must be a floating-point tensor, got ",
                   describe(t));
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "dualenc_fast: argument '", name,
                   "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ",
                   describe(t));
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "dualenc_fast: argument '", name,
                    "' must be on the device of '", ref_name, "' (", ref.device(), "), got ",
                    describe(t));
}

// The dtype and then the device of `ref`.
inline void check_matches(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_same_dtype(t, name, ref, ref_name);
  check_same_device(t, name, ref, ref_name);
}

// An optional 1-D argument (a bias) of length `n`, matching `ref`; None passes.
inline void check_optional_vector(const std::optional<at::Tensor>& t, const char* name, const char* shape,
                                  int64_t n, const char* what, const at::Tensor& ref, const char* ref_name) {
  if (!t.has_value() || !t->defined()) return;
  check_dim(*t, name, 1, shape);
  check_size(*t, name, 0, n, what);
  check_matches(*t, name, ref, ref_name);
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "dualenc_fast: argument '", name,
                   "' must be an int64 tensor, got ", describe(t));
}

// Checks values [B, k] and indices [B, k] (int64) together against F features.
inline void check_sparse_code(const at::Tensor& values, const at::Tensor& indices) {
  check_dim(values, "values", 2, "[B, k]");
  check_floating(values, "values");
  check_dim(indices, "indices", 2, "[B, k]");
  check_index_dtype(indices, "indices");
  check_same_device(indices, "indices", values, "values");
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), "dualenc_fast: argument 'indices' must have ",
                    "the shape of 'values' ", values.sizes(), ", got ", describe(indices));
}

// Whether kernels validate that every index lies in [0, F). On CUDA this costs
// one device-to-host sync per call; callers that produced the indices
// themselves may switch it off (dualenc_fast.ops.set_index_checks).
bool& index_checks_enabled();

// Raises IndexError naming `name` when an entry of `indices` is outside [0, num_rows).
void check_index_range(const at::Tensor& indices, const char* name, int64_t num_rows,
                       const char* rows_name);

}  // namespace dualenc_fast
