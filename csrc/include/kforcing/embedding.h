#pragma once
// noise_embedding / noise_conditioned_embedding: argument checks and the feature definition shared by the CPU and
// CUDA kernels.
//
// Features of a row with uniform u and temperature tau, F frequencies f_j = 10000^(-j/F):
//   [cos(2 pi u f), sin(2 pi u f), cos(2 pi tau f), sin(2 pi tau f)]   (4F values; weight is (H, 4F))
// The `code` option changes u's half (columns [0, 2F)) only; tau's half is always the sinusoids above, since
// tau is a temperature, not a position in [0, 1]:
//   sinusoid  the features above.
//   dyadic    cos(2 pi 2^j u), sin(2 pi 2^j u), j < F: feature j repeats with period 2^-j. The phase
//             frac(2^j u) is exact (u = M 2^-S, so it is M mod 2^(S-j) scaled), and only 2 pi phase in [-pi, pi]
//             meets a rounded sin/cos: the features are as accurate at j = 60 as at j = 0. They are 1-periodic in
//             u, so u = 1 encodes as u = 0.
//   binary    c = 2 d_{c+1} - 1 in {-1, +1} for c < 2F, d_k the k-th binary digit of u (weight 2^-k): the
//             expansion of u < 1 that terminates, and 0.111..._2 for u = 1, so u = 1 sits next to the uniforms
//             just below it rather than on top of u = 0. Digits are read from the exact fp64 value (fp32 u
//             converts exactly), so every device and precision gives the same digits. Piecewise constant in u.
// When tau is one value for many rows (a scalar, or one per sequence), the tau half of the product is the same
// vector for all of them: the kernels fold W[:, 2F:] @ features(tau) into the bias once and multiply only the u
// half, which halves the work without changing the result beyond rounding.

#include <ATen/core/Tensor.h>

#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "kforcing/checks.h"

namespace kforcing {

enum class NoiseCode : int { kSinusoid = 0, kDyadic = 1, kBinary = 2 };

// The schema's `code` string; anything else is an error that lists the choices.
inline NoiseCode parse_noise_code(c10::string_view code, const char* op) {
  if (code == "sinusoid") return NoiseCode::kSinusoid;
  if (code == "dyadic") return NoiseCode::kDyadic;
  if (code == "binary") return NoiseCode::kBinary;
  KF_CHECK_VALUE(false, op, "`code` must be one of 'sinusoid', 'dyadic', 'binary', got '", std::string(code), "'");
  return NoiseCode::kSinusoid;
}

// u = mantissa * 2^-shift exactly, mantissa < 2^53 (u in [0, 1] as fp64). A u outside [0, 1] or NaN, which the
// kernels reject (CPU) or turn into a NaN row (CUDA), decomposes as 0, so no conversion below is undefined.
struct DyadicParts {
  uint64_t mantissa;
  int shift;
  bool one;  // u == 1
};

C10_HOST_DEVICE inline DyadicParts dyadic_parts(double u) {
  if (!(u >= 0.0 && u <= 1.0)) return {0, 0, false};
  int exponent = 0;
  const double fraction = frexp(u, &exponent);  // u = fraction * 2^exponent, fraction in [1/2, 1) or 0
  return {static_cast<uint64_t>(ldexp(fraction, 53)), 53 - exponent, u == 1.0};
}

// The k-th binary digit of u (weight 2^-k), k >= 1; all ones for u = 1 (0.111..._2).
C10_HOST_DEVICE inline bool binary_digit(const DyadicParts& u, int64_t k) {
  if (u.one) return true;
  const int64_t bit = u.shift - k;  // the digit's position in the mantissa; outside [0, 64) it is 0
  return bit >= 0 && bit < 64 && ((u.mantissa >> bit) & 1u);
}

// frac(2^j u) - (1 if it is >= 1/2), in [-1/2, 1/2): the phase of the dyadic feature j, exact.
C10_HOST_DEVICE inline double dyadic_phase(const DyadicParts& u, int64_t j) {
  const int64_t bits = u.shift - j;  // fractional bits of 2^j u
  if (bits <= 0) return 0.0;
  const uint64_t low = bits >= 64 ? u.mantissa : u.mantissa & ((uint64_t{1} << bits) - 1);
  const double phase = ldexp(static_cast<double>(low), static_cast<int>(-bits));
  return phase >= 0.5 ? phase - 1.0 : phase;
}

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
