#pragma once
// decode_linear: y = x @ weight^T + bias for the few rows of a decode step. Argument checks shared by the CPU and
// CUDA entry points (kforcing_ops/linear.py has the Python mirror for the fake kernel).

#include <ATen/core/Tensor.h>

#include <initializer_list>

#include "kforcing/checks.h"

namespace kforcing {

// Calls of at most this many rows are decode steps: the fused noise embedding runs its GEMM through the
// decode_linear kernel then, so hint rows are row-invariant too (kforcing_ops.nn.DECODE_LINEAR_MAX_ROWS: the same).
constexpr int64_t kDecodeLinearMaxRows = 64;

namespace cpu {
// The CPU kernel of decode_linear (csrc/cpu/decode_linear.cpp), for other CPU kernels: x (M, K) fp32 or bf16,
// weight (N, K) fp32 or bf16 with unit stride along K, bias (N,) or undefined. Returns (M, N) in x's dtype.
at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
}  // namespace cpu

// Returns the number of rows M = prod(x.shape[:-1]).
inline int64_t check_decode_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        std::initializer_list<at::ScalarType> dtypes) {
  constexpr const char* op = "decode_linear";
  KF_CHECK_VALUE(x.dim() >= 1, op, "`x` must have at least 1 dim (..., in_features), got a 0-d tensor");
  check_dim(weight, 2, op, "weight", "(out_features, in_features)");
  check_dtype(x, dtypes, op, "x");
  check_dtype(weight, dtypes, op, "weight");
  check_same_device(weight, x, op, "weight", "x");
  KF_CHECK_VALUE(x.size(-1) == weight.size(1), op, "`x` must have in_features = weight.shape[1] = ", weight.size(1),
                 " in its last dim, got shape ", x.sizes());
  if (bias.has_value()) {
    check_dim(*bias, 1, op, "bias", "(out_features,)");
    check_dtype(*bias, dtypes, op, "bias");
    check_same_device(*bias, x, op, "bias", "x");
    check_size(*bias, 0, weight.size(0), op, "bias", "out_features = weight.shape[0]");
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

}  // namespace kforcing
