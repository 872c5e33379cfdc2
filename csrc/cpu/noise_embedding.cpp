// noise_embedding and noise_conditioned_embedding, CPU kernels: forward and backward.
//
// Features (kforcing/embedding.h) are generated kRowBlock rows at a time into a cache-resident scratch block
// (vectorised sin/cos, fp32, or fp64 for fp64 weights; u's half under the chosen code: sinusoids, dyadic
// sinusoids from the exact phase frac(2^j u), or +-1 binary digits of u) and multiplied straight into the output rows by the BLAS
// GEMM (at::addmm_out on row views of the output; decode_linear's kernel for the few rows of a decode step, which
// keeps each row's result independent of the others): the (M, 4F) feature tensor of the unfused form never exists.
// A tau shared by many rows (a scalar, or one per sequence in noise_conditioned_embedding) is folded into the bias
// (bias + W[:, 2F:] @ features(tau)), so only the u half, K = 2F, goes through the GEMM.
// Weights in bf16/fp16 are multiplied in fp32 and the output rounded once.
// Backward: grad_W[:, :2F] += g^T @ features(u) block by block; the tau half is g^T @ features(tau) per row, or, for a
// shared tau, (sum of g over its rows) outer features(tau). token_table's gradient is a scatter-add that runs in
// parallel over columns of H, so every row is summed in the same order: deterministic.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/addmv.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "kforcing/embedding.h"
#include "kforcing/linear.h"

namespace kforcing::cpu {
namespace {

constexpr int64_t kRowBlock = 128;  // rows per feature block: 128 x 1536 fp32 = 768 KB, resident in L2

template <typename T>
using Vec = at::vec::Vectorized<T>;

// A tau tensor as contiguous fp64, every value checked positive and finite.
at::Tensor checked_tau64(const at::Tensor& tau, const char* op) {
  at::Tensor tau64 = tau.to(at::kDouble).contiguous();
  check_tau_values(tau64, op);
  return tau64;
}

at::ScalarType compute_type(at::ScalarType weight) { return weight == at::kDouble ? at::kDouble : at::kFloat; }

// cos(omega * x) into out[0..F), sin(omega * x) into out[F..2F).
template <typename acc_t>
void sinusoids(acc_t x, const acc_t* omega, int64_t num_freqs, acc_t* out) {
  using V = Vec<acc_t>;
  const V vx(x);
  int64_t j = 0;
  for (; j + V::size() <= num_freqs; j += V::size()) {
    const V angle = V::loadu(omega + j) * vx;
    angle.cos().store(out + j);
    angle.sin().store(out + num_freqs + j);
  }
  for (; j < num_freqs; ++j) {
    out[j] = std::cos(omega[j] * x);
    out[num_freqs + j] = std::sin(omega[j] * x);
  }
}

// cos(angle[j]) into out[j], sin(angle[j]) into out[n + j], the angles read from out[n..2n) and overwritten.
template <typename acc_t>
void sinusoids_of_angles(int64_t n, acc_t* out) {
  using V = Vec<acc_t>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V angle = V::loadu(out + n + j);
    angle.cos().store(out + j);
    angle.sin().store(out + n + j);
  }
  for (; j < n; ++j) {
    const acc_t angle = out[n + j];
    out[j] = std::cos(angle);
    out[n + j] = std::sin(angle);
  }
}

// u's 2F features under `code` into out[0..2F). u is the exact input value (fp32 u converts to fp64 exactly).
template <typename acc_t>
void u_features(NoiseCode code, double u, const acc_t* omega, int64_t num_freqs, acc_t* out) {
  if (code == NoiseCode::kSinusoid) {
    sinusoids<acc_t>(static_cast<acc_t>(u), omega, num_freqs, out);
    return;
  }
  const DyadicParts parts = dyadic_parts(u);
  if (code == NoiseCode::kBinary) {
    for (int64_t c = 0; c < 2 * num_freqs; ++c) out[c] = binary_digit(parts, c + 1) ? acc_t(1) : acc_t(-1);
    return;
  }
  // The phase is exact in fp64; only 2 pi phase, in [-pi, pi], is rounded to the compute type.
  for (int64_t j = 0; j < num_freqs; ++j) out[num_freqs + j] = static_cast<acc_t>(2.0 * M_PI * dyadic_phase(parts, j));
  sinusoids_of_angles<acc_t>(num_freqs, out);
}

// 2 pi f_j, j < F, in the compute type `options` carries.
at::Tensor angular_frequencies(int64_t num_freqs, const at::TensorOptions& options) {
  at::Tensor omega = at::empty({num_freqs}, options.dtype(at::kDouble));
  auto* o = omega.mutable_data_ptr<double>();
  for (int64_t j = 0; j < num_freqs; ++j) o[j] = angular_frequency(j, num_freqs);
  return omega.to(options.dtype());
}

struct Frequencies {
  int64_t num_freqs;
  at::Tensor omega;  // (F): tau's angular frequencies, and u's under the sinusoid code
  NoiseCode code;    // u's features
};

// Everything the forward needs of one weight, in the compute type.
struct NoiseWeight : Frequencies {
  at::Tensor weight;    // (H, 4F)
  at::Tensor u_half;    // (H, 2F) view
  at::Tensor tau_half;  // (H, 2F) view
  at::Tensor bias;      // (H): zeros without a bias

  NoiseWeight(const at::Tensor& w, const std::optional<at::Tensor>& b, NoiseCode code)
      : Frequencies{w.size(1) / 4, angular_frequencies(w.size(1) / 4, w.options().dtype(compute_type(w.scalar_type()))),
                    code} {
    const auto type = compute_type(w.scalar_type());
    weight = w.to(type).contiguous();
    u_half = weight.narrow(1, 0, 2 * num_freqs);
    tau_half = weight.narrow(1, 2 * num_freqs, 2 * num_freqs);
    bias = b.has_value() ? b->to(type).contiguous() : at::zeros({w.size(0)}, w.options().dtype(type));
  }

  // bias + W[:, 2F:] @ [cos(omega tau), sin(omega tau)]: the bias of rows sharing tau.
  at::Tensor folded_bias(double tau) const {
    at::Tensor features = at::empty({2 * num_freqs}, bias.options());
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "folded_bias", [&] {
      sinusoids<scalar_t>(static_cast<scalar_t>(tau), omega.const_data_ptr<scalar_t>(), num_freqs,
                          features.mutable_data_ptr<scalar_t>());
    });
    return at::addmv(bias, tau_half, features);
  }
};

// Features of rows [first, first + n) into block (n, K): u features, then tau features when `tau` is given.
void fill_features(const Frequencies& w, const double* u, const double* tau, int64_t first, int64_t n,
                   at::Tensor& block) {
  const int64_t width = block.size(1), f = w.num_freqs;
  AT_DISPATCH_FLOATING_TYPES(block.scalar_type(), "noise_features", [&] {
    const scalar_t* omega = w.omega.const_data_ptr<scalar_t>();
    scalar_t* out = block.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        u_features<scalar_t>(w.code, u[first + r], omega, f, out + r * width);
        if (tau) sinusoids<scalar_t>(static_cast<scalar_t>(tau[first + r]), omega, f, out + r * width + 2 * f);
      }
    });
  });
}

// out (n, H) = features(u[0..n), tau) @ W^T + bias, tau per row (`tau` given) or folded into `folded_bias`.
void embed_rows(const NoiseWeight& w, const double* u, const double* tau, const at::Tensor& folded_bias, int64_t n,
                at::Tensor out) {
  const at::Tensor& weight = tau ? w.weight : w.u_half;
  const at::Tensor& bias = tau ? w.bias : folded_bias;
  const bool direct = out.scalar_type() == w.weight.scalar_type();
  at::Tensor block = at::empty({std::min(n, kRowBlock), weight.size(1)}, w.weight.options());
  at::Tensor staged = direct ? at::Tensor() : at::empty({block.size(0), out.size(1)}, w.weight.options());
  for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n - r0);
    at::Tensor features = block.narrow(0, 0, rows);
    fill_features(w, u, tau, r0, rows, features);
    if (n <= kDecodeLinearMaxRows && weight.scalar_type() == at::kFloat) {
      // A decode step's hint rows: the row-invariant kernel, so a hint's embedding does not depend on how many
      // hints share the call (the BLAS GEMM's blocking does).
      out.narrow(0, r0, rows).copy_(decode_linear_cpu(features, weight, bias));
    } else if (direct) {
      at::Tensor dst = out.narrow(0, r0, rows);
      at::addmm_out(dst, bias, features, weight.t());
    } else {
      at::Tensor dst = staged.narrow(0, 0, rows);
      at::addmm_out(dst, bias, features, weight.t());
      out.narrow(0, r0, rows).copy_(dst);
    }
  }
}

// grad_weight[:, cols] += g^T @ features for rows [0, n) (g: (n, H) in the compute type).
void accumulate_weight_grad(const Frequencies& w, const double* u, const double* tau, const at::Tensor& g, int64_t n,
                            at::Tensor& grad_weight) {
  const int64_t width = (tau ? 4 : 2) * w.num_freqs;
  at::Tensor target = grad_weight.narrow(1, 0, width);
  at::Tensor block = at::empty({std::min(n, kRowBlock), width}, grad_weight.options());
  for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n - r0);
    at::Tensor features = block.narrow(0, 0, rows);
    fill_features(w, u, tau, r0, rows, features);
    target.addmm_(g.narrow(0, r0, rows).t(), features);
  }
}

// The tau half of grad_weight for rows sharing one tau: (sum of their g) outer features(tau).
void accumulate_shared_tau_grad(const Frequencies& w, double tau, const at::Tensor& g_sum, at::Tensor& grad_weight) {
  at::Tensor features = at::empty({2 * w.num_freqs}, grad_weight.options());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "shared_tau_grad", [&] {
    sinusoids<scalar_t>(static_cast<scalar_t>(tau), w.omega.const_data_ptr<scalar_t>(), w.num_freqs,
                        features.mutable_data_ptr<scalar_t>());
  });
  grad_weight.narrow(1, 2 * w.num_freqs, 2 * w.num_freqs).addr_(g_sum, features);
}

at::Tensor checked_uniforms(const at::Tensor& u, const char* op) {
  at::Tensor u64 = u.to(at::kDouble).contiguous();
  const double* p = u64.const_data_ptr<double>();
  for (int64_t i = 0; i < u64.numel(); ++i) {
    KF_CHECK_VALUE(p[i] >= 0.0 && p[i] <= 1.0, op, "`u` must lie in [0, 1]; element ", i, " is ", p[i]);
  }
  return u64;
}

constexpr std::initializer_list<at::ScalarType> kWeightTypes = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};

at::Tensor noise_embedding_cpu(const at::Tensor& u, const std::optional<at::Tensor>& tau, double tau_value,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::string_view code) {
  check_noise_embedding_args(u, tau, tau_value, weight, bias, kWeightTypes);
  const NoiseCode u_code = parse_noise_code(code, "noise_embedding");
  const int64_t rows = u.size(0);
  at::Tensor out = at::empty({rows, weight.size(0)}, weight.options());
  if (rows == 0) return out;
  const at::Tensor u64 = checked_uniforms(u, "noise_embedding");
  const NoiseWeight w(weight, bias, u_code);
  if (tau.has_value()) {
    const at::Tensor tau64 = checked_tau64(*tau, "noise_embedding");
    embed_rows(w, u64.const_data_ptr<double>(), tau64.const_data_ptr<double>(), at::Tensor(), rows, out);
  } else {
    embed_rows(w, u64.const_data_ptr<double>(), nullptr, w.folded_bias(tau_value), rows, out);
  }
  return out;
}

std::tuple<at::Tensor, std::optional<at::Tensor>> noise_embedding_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& u, const std::optional<at::Tensor>& tau, double tau_value,
    int64_t num_freqs, bool with_bias, c10::string_view code) {
  const NoiseCode u_code = parse_noise_code(code, "noise_embedding_backward");
  const auto type = compute_type(grad_out.scalar_type());
  const at::Tensor g = grad_out.to(type).contiguous();
  const at::Tensor u64 = u.to(at::kDouble).contiguous();
  const Frequencies w{num_freqs, angular_frequencies(num_freqs, g.options()), u_code};
  at::Tensor grad_weight = at::zeros({grad_out.size(1), 4 * num_freqs}, g.options());
  const int64_t rows = g.size(0);
  if (tau.has_value()) {
    const at::Tensor tau64 = checked_tau64(*tau, "noise_embedding_backward");
    accumulate_weight_grad(w, u64.const_data_ptr<double>(), tau64.const_data_ptr<double>(), g, rows, grad_weight);
  } else {
    accumulate_weight_grad(w, u64.const_data_ptr<double>(), nullptr, g, rows, grad_weight);
    accumulate_shared_tau_grad(w, tau_value, g.sum(0), grad_weight);
  }
  std::optional<at::Tensor> grad_bias;
  if (with_bias) grad_bias = g.sum(0).to(grad_out.scalar_type());
  return {grad_weight.to(grad_out.scalar_type()), grad_bias};
}

// The token rows: out[b, t] = token_table[ids[b, t]], every id checked first.
template <typename id_t>
void gather_tokens(const at::Tensor& ids, const at::Tensor& table, at::Tensor& out) {
  const int64_t batch = ids.size(0), tokens = ids.size(1), vocab = table.size(0), width = table.size(1);
  const at::Tensor ids_c = ids.contiguous();
  const id_t* id = ids_c.const_data_ptr<id_t>();
  for (int64_t i = 0; i < batch * tokens; ++i) {
    KF_CHECK_VALUE(id[i] >= 0 && id[i] < vocab, "noise_conditioned_embedding", "`token_ids` must lie in [0, V=",
                   vocab, "); element (", i / tokens, ", ", i % tokens, ") is ", static_cast<int64_t>(id[i]));
  }
  const at::Tensor table_c = table.contiguous();
  const auto* src = static_cast<const char*>(table_c.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t row_bytes = width * table.element_size(), out_stride = out.stride(0) * table.element_size();
  at::parallel_for(0, batch * tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + (i / tokens) * out_stride + (i % tokens) * row_bytes, src + id[i] * row_bytes, row_bytes);
    }
  });
}

at::Tensor noise_conditioned_embedding_cpu(const at::Tensor& token_ids, const at::Tensor& token_table,
                                           const at::Tensor& u, const std::optional<at::Tensor>& tau, double tau_value,
                                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                           c10::string_view code) {
  check_noise_conditioned_args(token_ids, token_table, u, tau, tau_value, weight, bias, kWeightTypes);
  const NoiseCode u_code = parse_noise_code(code, "noise_conditioned_embedding");
  // Every sequence's tau is checked, whether or not it has hint rows (as the reference does).
  const at::Tensor tau64 = tau.has_value() ? checked_tau64(*tau, "noise_conditioned_embedding") : at::Tensor();
  const int64_t batch = token_ids.size(0), contexts = token_ids.size(1), hints = u.size(1);
  at::Tensor out = at::empty({batch, contexts + hints, weight.size(0)}, weight.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_INDEX_TYPES(token_ids.scalar_type(), "gather_tokens",
                          [&] { gather_tokens<index_t>(token_ids, token_table, out); });
  if (hints == 0) return out;
  const at::Tensor u64 = checked_uniforms(u, "noise_conditioned_embedding");
  const NoiseWeight w(weight, bias, u_code);
  const at::Tensor shared = tau.has_value() ? at::Tensor() : w.folded_bias(tau_value);
  for (int64_t b = 0; b < batch; ++b) {
    const at::Tensor folded = tau.has_value() ? w.folded_bias(tau64.const_data_ptr<double>()[b]) : shared;
    embed_rows(w, u64.const_data_ptr<double>() + b * hints, nullptr, folded, hints, out[b].narrow(0, contexts, hints));
  }
  return out;
}

template <typename id_t>
void scatter_token_grads(const at::Tensor& ids, const at::Tensor& g, at::Tensor& grad_table) {
  const at::Tensor ids_c = ids.contiguous();
  const id_t* id = ids_c.const_data_ptr<id_t>();
  const int64_t batch = ids.size(0), tokens = ids.size(1), width = grad_table.size(1);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "scatter_token_grads", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_table.mutable_data_ptr<scalar_t>();
    const int64_t seq = g.size(1);
    // Columns in parallel: each column sums its rows in one fixed order.
    at::parallel_for(0, width, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t i = 0; i < batch * tokens; ++i) {
        const scalar_t* row = src + ((i / tokens) * seq + i % tokens) * width;
        scalar_t* acc = dst + id[i] * width;
        for (int64_t c = c0; c < c1; ++c) acc[c] += row[c];
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> noise_conditioned_embedding_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& token_ids, int64_t vocab, const at::Tensor& u,
    const std::optional<at::Tensor>& tau, double tau_value, int64_t num_freqs, bool with_bias,
    c10::string_view code) {
  const NoiseCode u_code = parse_noise_code(code, "noise_conditioned_embedding_backward");
  const auto type = compute_type(grad_out.scalar_type());
  const at::Tensor g = grad_out.to(type).contiguous();
  const int64_t batch = g.size(0), contexts = token_ids.size(1), hints = u.size(1), width = g.size(2);
  at::Tensor grad_table = at::zeros({vocab, width}, g.options());
  AT_DISPATCH_INDEX_TYPES(token_ids.scalar_type(), "scatter_token_grads",
                          [&] { scatter_token_grads<index_t>(token_ids, g, grad_table); });
  at::Tensor grad_weight = at::zeros({width, 4 * num_freqs}, g.options());
  at::Tensor grad_bias = at::zeros({width}, g.options());
  const at::Tensor u64 = u.to(at::kDouble).contiguous();
  const at::Tensor tau64 = tau.has_value() ? checked_tau64(*tau, "noise_conditioned_embedding_backward") : at::Tensor();
  const Frequencies w{num_freqs, angular_frequencies(num_freqs, g.options()), u_code};
  for (int64_t b = 0; b < batch && hints > 0; ++b) {
    const at::Tensor gb = g[b].narrow(0, contexts, hints);
    accumulate_weight_grad(w, u64.const_data_ptr<double>() + b * hints, nullptr, gb, hints, grad_weight);
    const at::Tensor g_sum = gb.sum(0);
    accumulate_shared_tau_grad(w, tau.has_value() ? tau64.const_data_ptr<double>()[b] : tau_value, g_sum,
                               grad_weight);
    grad_bias += g_sum;
  }
  const auto out_type = grad_out.scalar_type();
  std::optional<at::Tensor> bias_grad;
  if (with_bias) bias_grad = grad_bias.to(out_type);
  return {grad_table.to(out_type), grad_weight.to(out_type), bias_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CPU, m) {
  m.impl("noise_embedding", &noise_embedding_cpu);
  m.impl("noise_embedding_backward", &noise_embedding_backward_cpu);
  m.impl("noise_conditioned_embedding", &noise_conditioned_embedding_cpu);
  m.impl("noise_conditioned_embedding_backward", &noise_conditioned_embedding_backward_cpu);
}

}  // namespace kforcing::cpu
