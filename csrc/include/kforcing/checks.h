#pragma once
// Argument checks shared by the CPU and CUDA entry points.
//
// Every message names the op, the argument and what was expected ("kforcing.inverse_cdf_sample: `u` must
// be 1-D (N,), got shape [3, 2]"), so a user can fix the call without reading a kernel. Shape and value
// problems raise ValueError, dtype problems TypeError, as the Python-side checks in
// kforcing_ops/_checks.py do for the fake kernels and the references.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>

#define KF_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE(cond, "kforcing.", op, ": ", __VA_ARGS__)
#define KF_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "kforcing.", op, ": ", __VA_ARGS__)

namespace kforcing {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  KF_CHECK_VALUE(t.dim() == dim, op, "`", name, "` must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name,
                       const char* what) {
  KF_CHECK_VALUE(t.size(dim) == expected, op, "`", name, "` must have size ", expected, " in dim ", dim, " (",
                 what, "), got shape ", t.sizes());
}

inline std::string dtype_list(std::initializer_list<at::ScalarType> allowed) {
  std::ostringstream out;
  const char* sep = "";
  for (auto type : allowed) {
    out << sep << c10::toString(type);
    sep = ", ";
  }
  return out.str();
}

inline void check_dtype(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed, const char* op,
                        const char* name) {
  bool ok = false;
  for (auto type : allowed) ok = ok || t.scalar_type() == type;
  KF_CHECK_TYPE(ok, op, "`", name, "` must have dtype in {", dtype_list(allowed), "}, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  KF_CHECK_VALUE(t.device() == ref.device(), op, "`", name, "` is on ", t.device(), " but `", ref_name,
                 "` is on ", ref.device(), "; all tensors must be on one device");
}

}  // namespace kforcing
