#pragma once
// inverse_cdf_sample: argument checks and the sampling rule's constants, shared by the CPU and CUDA kernels.
//
// The rule (documented for users in kforcing_ops/sampling.py):
//   p = softmax(logits * inv_t) with inv_t = min(1 / T, the largest finite value of the compute type: fp32, or
//   fp64 for fp64 logits), restricted to the top-k logits (ties at the k-th value kept), then to the top-p
//   nucleus (a token is kept when the mass of strictly larger logits is < top_p; ties kept), renormalised.
//   The support is the finite logits that survive the filters (-inf logits never do).
//   The CDF walks the support in an order: "vocab", token ids 0..V-1; or "descending", logits from the largest
//   down (the order of the probabilities, which the logits give exactly at any temperature), equal logits by
//   smaller id first. The token is the first support token in that order whose running mass sum p >= u; u = 0
//   gives the first support token in the order, u = 1 the last, and if rounding leaves u above the total mass,
//   the last one is returned. Both orders sample the same distribution exactly; they map u differently.

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>

#include "kforcing/checks.h"

namespace kforcing {

// Returned on CUDA for a row that is invalid (NaN or +inf logit, no finite logit, u outside [0, 1], or a
// temperature that is not positive and finite). The CPU kernel raises instead.
constexpr int64_t kInvalidSample = -1;

enum class CdfOrder : int { kVocab = 0, kDescending = 1 };

// The schema's `order` string; anything else is an error that lists the choices.
inline CdfOrder parse_cdf_order(c10::string_view order) {
  if (order == "vocab") return CdfOrder::kVocab;
  if (order == "descending") return CdfOrder::kDescending;
  KF_CHECK_VALUE(false, "inverse_cdf_sample", "`order` must be 'vocab' or 'descending', got '", std::string(order),
                 "'");
  return CdfOrder::kVocab;
}

inline bool sampling_filters_support(int64_t top_k, int64_t vocab, double top_p) {
  return (top_k > 0 && top_k < vocab) || top_p < 1.0;
}

// `logits_dtypes`: what the device's kernel samples (fp64 on CPU only).
inline void check_inverse_cdf_sample_args(const at::Tensor& logits, const at::Tensor& u,
                                          const std::optional<at::Tensor>& temperatures, double temperature,
                                          int64_t top_k, double top_p,
                                          std::initializer_list<at::ScalarType> logits_dtypes) {
  constexpr const char* op = "inverse_cdf_sample";
  check_dim(logits, 2, op, "logits", "(N, V)");
  KF_CHECK_TYPE(logits.scalar_type() != at::kDouble || logits.is_cpu(), op,
                "`logits` of dtype float64 are sampled on CPU only; on ", logits.device(),
                " pass float32, bfloat16 or float16 logits");
  check_dtype(logits, logits_dtypes, op, "logits");
  KF_CHECK_VALUE(logits.size(1) >= 1, op, "`logits` needs at least one vocabulary column, got shape ",
                 logits.sizes());
  check_dim(u, 1, op, "u", "(N,)");
  check_size(u, 0, logits.size(0), op, "u", "one uniform per row of logits");
  check_dtype(u, {at::kFloat, at::kDouble}, op, "u");
  check_same_device(u, logits, op, "u", "logits");
  if (temperatures.has_value()) {
    check_dim(*temperatures, 1, op, "temperature", "(N,) when a tensor");
    check_size(*temperatures, 0, logits.size(0), op, "temperature", "one temperature per row of logits");
    check_dtype(*temperatures, {at::kFloat, at::kDouble}, op, "temperature");
    check_same_device(*temperatures, logits, op, "temperature", "logits");
  } else {
    KF_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), op,
                   "`temperature` must be positive and finite, got ", temperature);
  }
  KF_CHECK_VALUE(top_k >= 0, op, "`top_k` must be >= 0 (0 disables it), got ", top_k);
  KF_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, op, "`top_p` must be in (0, 1] (1 disables it), got ", top_p);
}

}  // namespace kforcing
