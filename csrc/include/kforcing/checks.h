#pragma once
// Argument checks shared by the CPU and CUDA entry points.
//
// Every message names the op, the argument and what was expected ("kforcing.inverse_cdf_sample: `u` must
// be 1-D (N,), got shape [3, 2]"), so a user can fix the call without reading a kernel. Shape and value
// problems raise ValueError, dtype problems TypeError, as the Python-side checks in
// kforcing_ops/_checks.py do for the fake kernels and the references.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

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

// Memory layout, from sizes, strides and storage only (no data access, so no host sync on CUDA).

// Whether no two elements of `t` share memory: with the dims of size > 1 sorted by stride, each stride must step
// past everything the smaller ones span. Expanded (stride-0) dims fail. Sufficient, and exact for every layout
// made by slicing, permuting or viewing a dense tensor.
inline bool is_non_overlapping(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // elements spanned by the dims so far, minus one
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += stride * (size - 1);
  }
  return true;
}

// Whether `a` and `b` may share memory: one storage and intersecting byte ranges.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  auto range = [](const at::Tensor& t) {
    int64_t last = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) last += t.stride(d) * (t.size(d) - 1);
    return std::pair<int64_t, int64_t>{t.storage_offset() * t.itemsize(), (last + 1) * t.itemsize()};
  };
  const auto [a0, a1] = range(a);
  const auto [b0, b1] = range(b);
  return a0 < b1 && b0 < a1;
}

}  // namespace kforcing
