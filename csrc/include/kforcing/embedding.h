#pragma once
// noise_embedding / noise_conditioned_embedding: argument checks and the feature definition shared by the CPU and
// CUDA kernels.
//
// Features of a row with uniform u and temperature tau, F frequencies f_j = 10000^(-j/F):
//   [cos(2 pi u f), sin(2 pi u f), cos(2 pi tau f), sin(2 pi tau f)]   (4F values; weight is (H, 4F))
// When tau is one value for many rows (a scalar, or one per sequence), the tau half of the product is the same
// vector for all of them: the kernels fold W[:, 2F:] @ features(tau) into the bias once and multiply only the u
// half, which halves the work without changing the result beyond rounding.

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "kforcing/checks.h"

namespace kforcing {

// 2 pi f_j in fp64; kernels round it once to their compute type.
inline double angular_frequency(int64_t j, int64_t num_freqs) {
  return 2.0 * M_PI * std::pow(10000.0, -static_cast<double>(j) / static_cast<double>(num_freqs));
}

// Every temperature tau, a scalar or one per row / sequence, must be positive and finite. A scalar is checked
// here; tensor values by check_tau_values on CPU, and turned into NaN rows on CUDA (no host sync).
inline void check_tau_value(double tau, const char* op) {
  KF_CHECK_VALUE(tau > 0.0 && std::isfinite(tau), op, "`tau` must be positive and finite, got ", tau);
}

// tau64: a contiguous fp64 CPU tensor. Reads every value (CPU only).
inline void check_tau_values(const at::Tensor& tau64, const char* op) {
  const double* tau = tau64.const_data_ptr<double>();
  for (int64_t i = 0; i < tau64.numel(); ++i) {
    KF_CHECK_VALUE(tau[i] > 0.0 && std::isfinite(tau[i]), op, "`tau` must be positive and finite; element ", i,
                   " is ", tau[i]);
  }
}

inline int64_t check_noise_weight(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  std::initializer_list<at::ScalarType> dtypes, const char* op) {
  check_dim(weight, 2, op, "weight", "(H, 4F)");
  check_dtype(weight, dtypes, op, "weight");
  KF_CHECK_VALUE(weight.size(1) > 0 && weight.size(1) % 4 == 0, op,
                 "`weight` must be (H, 4F): cos/sin features of u and of tau, F per part; got shape ", weight.sizes());
  if (bias.has_value()) {
    check_dim(*bias, 1, op, "bias", "(H,)");
    check_size(*bias, 0, weight.size(0), op, "bias", "H, the rows of weight");
    KF_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), op, "`bias` has dtype ", bias->scalar_type(),
                  " but `weight` has ", weight.scalar_type());
    check_same_device(*bias, weight, op, "bias", "weight");
  }
  return weight.size(1) / 4;
}

inline void check_noise_embedding_args(const at::Tensor& u, const std::optional<at::Tensor>& tau, double tau_value,
                                       const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                       std::initializer_list<at::ScalarType> dtypes) {
  constexpr const char* op = "noise_embedding";
  check_dim(u, 1, op, "u", "(M,)");
  check_dtype(u, {at::kFloat, at::kDouble}, op, "u");
  check_noise_weight(weight, bias, dtypes, op);
  check_same_device(weight, u, op, "weight", "u");
  if (tau.has_value()) {
    check_dim(*tau, 1, op, "tau", "(M,) when a tensor");
    check_size(*tau, 0, u.size(0), op, "tau", "one temperature per row of u");
    check_dtype(*tau, {at::kFloat, at::kDouble}, op, "tau");
    check_same_device(*tau, u, op, "tau", "u");
  } else {
    check_tau_value(tau_value, op);
  }
}

inline void check_noise_conditioned_args(const at::Tensor& token_ids, const at::Tensor& token_table,
                                         const at::Tensor& u, const std::optional<at::Tensor>& tau, double tau_value,
                                         const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                         std::initializer_list<at::ScalarType> dtypes) {
  constexpr const char* op = "noise_conditioned_embedding";
  check_dim(token_ids, 2, op, "token_ids", "(B, Tc)");
  check_dtype(token_ids, {at::kLong, at::kInt}, op, "token_ids");
  check_dim(token_table, 2, op, "token_table", "(V, H)");
  check_dim(u, 2, op, "u", "(B, Th)");
  check_dtype(u, {at::kFloat, at::kDouble}, op, "u");
  check_size(u, 0, token_ids.size(0), op, "u", "batch, as token_ids");
  check_noise_weight(weight, bias, dtypes, op);
  check_size(weight, 0, token_table.size(1), op, "weight", "H, the width of token_table");
  KF_CHECK_TYPE(weight.scalar_type() == token_table.scalar_type(), op, "`weight` has dtype ", weight.scalar_type(),
                " but `token_table` has ", token_table.scalar_type());
  for (const auto* t : {&token_table, &u, &weight}) check_same_device(*t, token_ids, op, "an input", "token_ids");
  if (tau.has_value()) {
    check_dim(*tau, 1, op, "tau", "(B,) when a tensor: one temperature per sequence");
    check_size(*tau, 0, u.size(0), op, "tau", "one temperature per sequence");
    check_dtype(*tau, {at::kFloat, at::kDouble}, op, "tau");
    check_same_device(*tau, u, op, "tau", "u");
  } else {
    check_tau_value(tau_value, op);
  }
}

}  // namespace kforcing
