// noise_embedding and noise_conditioned_embedding, CUDA kernels.
//
// Forward: out[row] = features(u[row], tau) @ W^T + bias, with the features (kforcing/embedding.h) generated
// inside the GEMM: no (M, 4F) tensor is ever written.
//   A tau shared by many rows (a scalar, or one per sequence) is folded into a per-source fp32 bias first,
//   bias + W[:, 2F:] @ features(tau), a tiny GEMM, so the main GEMM runs over the u half only (K = 2F).
//   noise_gemm_mma_kernel (bf16/fp16 weights): 128 x 256 output tiles, 8 warps of 64 x 64, mma.sync m16n8k16 with
//     fp32 accumulators. Per 32-wide K step each block generates its 128 x 32 feature tile in shared memory: the
//     phase 2 pi (f u - round(f u)) is reduced to [-pi, pi] first, where the hardware __sinf/__cosf are accurate to
//     ~2^-21, far below bf16/fp16 rounding. W tiles are staged with 16-byte loads; rows padded by 8 elements.
//   noise_gemm_simt_kernel (fp32 weights, and shapes the tensor-core path does not take): 64 x 64 tiles, 4 x 4
//     outputs per thread, accurate sincospif features, fp32 throughout.
//   Under the dyadic and binary codes (kforcing/embedding.h) u's features come from the exact fp64 u instead: the
//     integer mantissa gives the digit, or the phase frac(2^j u) in [-1/2, 1/2), so only sin/cos of a reduced
//     angle is rounded (fast or accurate as above). A warp-uniform branch; no extra instantiations.
//   The epilogue adds the row's bias and writes the row where the caller wants it (rows Tc.. of each sequence for
//   noise_conditioned_embedding), or NaN when u is outside [0, 1].
// noise_conditioned_embedding's token rows are a gather that writes NaN for an id outside [0, V) and never reads
// outside the table. Backward: grad_W[:, :2F] = g^T features(u) by a split-M SIMT kernel (fp32 partials summed in a
// fixed order: deterministic); the tau half, the bias and token_table gradients use PyTorch ops (the token_table
// scatter is index_put with accumulate, deterministic when torch.use_deterministic_algorithms is on).

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "kforcing/cuda_utils.cuh"
#include "kforcing/dispatch.h"
#include "kforcing/embedding.h"
#include "kforcing/mma.cuh"

namespace kforcing::cuda {
namespace {

// Tensor-core GEMM tiles.
constexpr int kGemmM = 128, kGemmN = 256, kGemmK = 32, kGemmWarps = 8, kGemmPad = 8;
constexpr int kGemmStride = kGemmK + kGemmPad;
// CUDA-core GEMM tiles.
constexpr int kSimtTile = 64, kSimtK = 16, kSimtThreads = 256;
// Weight-gradient rows per split of the M reduction.
constexpr int64_t kGradRowsPerSplit = 2048;

struct NoiseGemmParams {
  const void* weight;   // (H, weight_stride): columns [0, K) are used
  const float* bias;    // (bias sources, H) fp32
  const float* freqs;   // (F): f_j
  const float* u;       // (rows)
  const double* u64;    // (rows): the exact u the dyadic and binary codes read; null for sinusoids
  NoiseCode code;       // u's features
  const float* tau;     // (rows) when K = 4F, else null
  void* out;
  int64_t rows, hidden, num_freqs, k, weight_stride;
  int64_t rows_per_seq, seq_rows, seq_offset;  // row m goes to (m / rows_per_seq) * seq_rows + seq_offset + m % ...
  bool bias_per_seq;

  __device__ int64_t out_row(int64_t m) const {
    return ((m / rows_per_seq) * seq_rows + seq_offset + m % rows_per_seq) * hidden;
  }
  __device__ const float* bias_row(int64_t m) const { return bias + (bias_per_seq ? m / rows_per_seq : 0) * hidden; }
};

// u's feature `col` < 2F under the dyadic or binary code, from the exact u; `fast`: hardware sin/cos (the reduced
// angle is in [-pi, pi], where they are accurate to ~2^-21).
__device__ __forceinline__ float coded_feature(const NoiseGemmParams& p, int64_t row, int64_t col, bool fast) {
  const DyadicParts parts = dyadic_parts(p.u64[row]);
  if (p.code == NoiseCode::kBinary) return binary_digit(parts, col + 1) ? 1.f : -1.f;
  const float phase = static_cast<float>(dyadic_phase(parts, col % p.num_freqs));  // exact until this rounding
  float s, c;
  if (fast) {
    __sincosf(6.283185307179586f * phase, &s, &c);
  } else {
    sincospif(2.f * phase, &s, &c);
  }
  return col < p.num_freqs ? c : s;
}

// Feature `col` of a row, phase-reduced to [-pi, pi] for the fast hardware sin/cos (mma path).
__device__ __forceinline__ float fast_feature(const NoiseGemmParams& p, int64_t row, int64_t col) {
  const int64_t part = col / p.num_freqs, j = col % p.num_freqs;
  if (part < 2 && p.code != NoiseCode::kSinusoid) return coded_feature(p, row, col, true);
  const float x = part < 2 ? p.u[row] : p.tau[row];
  const float turns = p.freqs[j] * x;
  const float angle = 6.283185307179586f * (turns - rintf(turns));
  return part % 2 == 0 ? __cosf(angle) : __sinf(angle);
}

// The same feature to fp32 accuracy (simt path, fp32 outputs): sin(pi * 2fx), cos(pi * 2fx).
__device__ __forceinline__ float exact_feature(const NoiseGemmParams& p, int64_t row, int64_t col) {
  const int64_t part = col / p.num_freqs, j = col % p.num_freqs;
  if (part < 2 && p.code != NoiseCode::kSinusoid) return coded_feature(p, row, col, false);
  const float x = part < 2 ? p.u[row] : p.tau[row];
  float s, c;
  sincospif(2.f * p.freqs[j] * x, &s, &c);
  return part % 2 == 0 ? c : s;
}

__device__ __forceinline__ bool valid_uniform(float u) { return u >= 0.f && u <= 1.f; }

template <typename T>
__global__ void __launch_bounds__(kGemmWarps * 32) noise_gemm_mma_kernel(NoiseGemmParams p) {
  __shared__ __align__(16) uint16_t a_s[kGemmM * kGemmStride];
  __shared__ __align__(16) uint16_t w_s[kGemmN * kGemmStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_m = warp / 4, warp_n = warp % 4;  // 2 x 4 warps of 64 x 64
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kGemmM, n0 = static_cast<int64_t>(blockIdx.y) * kGemmN;
  const uint16_t* weight = static_cast<const uint16_t*>(p.weight);
  float acc[4][8][4] = {};

  for (int64_t k0 = 0; k0 < p.k; k0 += kGemmK) {
    __syncthreads();
    for (int i = threadIdx.x; i < kGemmM * kGemmK; i += kGemmWarps * 32) {
      const int r = i / kGemmK, c = i % kGemmK;
      const int64_t row = m0 + r, col = k0 + c;
      const float value = row < p.rows && col < p.k ? fast_feature(p, row, col) : 0.f;
      const T converted = static_cast<T>(value);
      a_s[r * kGemmStride + c] = *reinterpret_cast<const uint16_t*>(&converted);
    }
    for (int i = threadIdx.x; i < kGemmN * (kGemmK / 8); i += kGemmWarps * 32) {
      const int r = i / (kGemmK / 8), chunk = i % (kGemmK / 8);
      const int64_t n = n0 + r, col = k0 + chunk * 8;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (n < p.hidden && col < p.k) value = *reinterpret_cast<const uint4*>(weight + n * p.weight_stride + col);
      *reinterpret_cast<uint4*>(w_s + r * kGemmStride + chunk * 8) = value;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmK / 16; ++kk) {
      uint32_t a_frag[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) mma::load_a(a_frag[mt], a_s, kGemmStride, warp_m * 64 + mt * 16, kk * 16, g, t);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t b_frag[2];
        mma::load_b_rows_n(b_frag, w_s, kGemmStride, warp_n * 64 + nt * 8, kk * 16, g, t);
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) mma::mma_16816<T>(acc[mt][nt], a_frag[mt], b_frag);
      }
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = m0 + warp_m * 64 + mt * 16 + g + 8 * half;
      if (row >= p.rows) continue;
      const bool ok = valid_uniform(p.u[row]);
      const float* bias = p.bias_row(row);
      T* dst = out + p.out_row(row);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t n = n0 + warp_n * 64 + nt * 8 + 2 * t + c;
          if (n < p.hidden) dst[n] = static_cast<T>(ok ? acc[mt][nt][2 * half + c] + bias[n] : NAN);
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) noise_gemm_simt_kernel(NoiseGemmParams p) {
  __shared__ float a_s[kSimtK][kSimtTile + 1];
  __shared__ float w_s[kSimtK][kSimtTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 x 16 threads, 4 x 4 outputs each
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSimtTile, n0 = static_cast<int64_t>(blockIdx.y) * kSimtTile;
  const T* weight = static_cast<const T*>(p.weight);
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += kSimtK) {
    __syncthreads();
    for (int i = threadIdx.x; i < kSimtK * kSimtTile; i += kSimtThreads) {
      const int kk = i % kSimtK, r = i / kSimtK;
      const int64_t col = k0 + kk;
      a_s[kk][r] = m0 + r < p.rows && col < p.k ? exact_feature(p, m0 + r, col) : 0.f;
      w_s[kk][r] = n0 + r < p.hidden && col < p.k ? static_cast<float>(weight[(n0 + r) * p.weight_stride + col]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      float a[4], w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = a_s[kk][ty * 4 + i];
        w[i] = w_s[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * w[j];
      }
    }
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty * 4 + i;
    if (row >= p.rows) continue;
    const bool ok = valid_uniform(p.u[row]);
    const float* bias = p.bias_row(row);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n < p.hidden) out[p.out_row(row) + n] = static_cast<T>(ok ? acc[i][j] + bias[n] : NAN);
    }
  }
}

// grad_W[n, col] partial over the rows of one split: sum_m g[m, n] * features(m)[col], col < 2F (the u half).
template <typename T>
__global__ void __launch_bounds__(kSimtThreads) weight_grad_kernel(NoiseGemmParams p, const T* grad,
                                                                    int64_t grad_rows_per_seq, int64_t grad_seq_rows,
                                                                    int64_t grad_offset, float* partial) {
  __shared__ float g_s[kSimtK][kSimtTile + 1];
  __shared__ float f_s[kSimtK][kSimtTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kSimtTile, c0 = static_cast<int64_t>(blockIdx.y) * kSimtTile;
  const int64_t r_begin = blockIdx.z * kGradRowsPerSplit, r_end = min(p.rows, r_begin + kGradRowsPerSplit);
  auto grad_row = [&](int64_t m) {
    return ((m / grad_rows_per_seq) * grad_seq_rows + grad_offset + m % grad_rows_per_seq) * p.hidden;
  };
  float acc[4][4] = {};
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kSimtK) {
    __syncthreads();
    for (int i = threadIdx.x; i < kSimtK * kSimtTile; i += kSimtThreads) {
      const int kk = i / kSimtTile, c = i % kSimtTile;
      const int64_t m = r0 + kk;
      const bool row_ok = m < r_end;
      g_s[kk][c] = row_ok && n0 + c < p.hidden ? static_cast<float>(grad[grad_row(m) + n0 + c]) : 0.f;
      f_s[kk][c] = row_ok && c0 + c < p.k ? exact_feature(p, m, c0 + c) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += g_s[kk][ty * 4 + i] * f_s[kk][tx * 4 + j];
      }
    }
  }
  float* dst = partial + static_cast<int64_t>(blockIdx.z) * p.hidden * p.k;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t n = n0 + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx * 4 + j;
      if (n < p.hidden && c < p.k) dst[n * p.k + c] = acc[i][j];
    }
  }
}

template <typename T, typename Id>
__global__ void gather_tokens_kernel(const Id* ids, const T* table, T* out, int64_t tokens, int64_t seq_rows,
                                     int64_t vocab, int64_t hidden) {
  const int64_t i = blockIdx.x;  // (b, t)
  const int64_t id = ids[i];
  T* dst = out + ((i / tokens) * seq_rows + i % tokens) * hidden;
  const bool ok = id >= 0 && id < vocab;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = ok ? table[id * hidden + c] : static_cast<T>(NAN);
}

at::Tensor frequencies(int64_t num_freqs, const at::TensorOptions& options) {
  // f_j = 10000^(-j/F), computed in fp64, used in fp32.
  const at::Tensor j = at::arange(num_freqs, options.dtype(at::kDouble));
  return at::pow(10000.0, -j / static_cast<double>(num_freqs)).to(at::kFloat);
}

// A tau that is not positive and finite becomes NaN, so every row it conditions comes out NaN: the documented
// signal for an invalid per-row tau, since raising would need a host sync (a scalar tau is checked on the host).
at::Tensor invalid_tau_to_nan(const at::Tensor& tau) {
  return at::where(tau.gt(0) & tau.isfinite(), tau, std::numeric_limits<double>::quiet_NaN());
}

// (sources, 2F) fp32 features of each tau.
at::Tensor tau_features(const at::Tensor& tau, int64_t num_freqs) {
  const at::Tensor angle = 2.0 * M_PI * tau.to(at::kDouble).unsqueeze(1) *
                           frequencies(num_freqs, tau.options()).to(at::kDouble).unsqueeze(0);
  return at::cat({angle.cos(), angle.sin()}, 1).to(at::kFloat);
}

// bias + features(tau) @ W[:, 2F:]^T for every tau source: (sources, H) fp32.
at::Tensor folded_bias(const at::Tensor& tau_sources, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t f = weight.size(1) / 4;
  const at::Tensor base = bias.has_value() ? bias->to(at::kFloat) : at::zeros({weight.size(0)}, tau_sources.options().dtype(at::kFloat));
  return at::addmm(base.unsqueeze(0), tau_features(tau_sources, f), weight.narrow(1, 2 * f, 2 * f).to(at::kFloat).t());
}

// The tensor-core path stages W with 16-byte loads: rows must start 16-byte aligned.
bool mma_path(const at::Tensor& weight) {
  return weight.scalar_type() != at::kFloat && weight.size(1) % 8 == 0 && weight.stride(1) == 1 &&
         weight.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % 16 == 0 &&
         at::cuda::getCurrentDeviceProperties()->major >= mma::kMinMajor;
}

void launch_noise_gemm(const NoiseGemmParams& p, const at::Tensor& weight) {
  if (p.rows == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  KF_DISPATCH_FLOAT_HALF_BF16(weight.scalar_type(), "noise_gemm", [&] {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (mma_path(weight)) {
        const dim3 grid(ceil_div(p.rows, kGemmM), ceil_div(p.hidden, kGemmN));
        noise_gemm_mma_kernel<scalar_t><<<grid, kGemmWarps * 32, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    const dim3 grid(ceil_div(p.rows, kSimtTile), ceil_div(p.hidden, kSimtTile));
    noise_gemm_simt_kernel<scalar_t><<<grid, kSimtThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr std::initializer_list<at::ScalarType> kCudaWeightTypes = {at::kFloat, at::kBFloat16, at::kHalf};

// The exact uniforms the dyadic and binary codes read (fp32 u converts exactly); undefined for sinusoids.
at::Tensor exact_uniforms(const at::Tensor& u, NoiseCode code) {
  return code == NoiseCode::kSinusoid ? at::Tensor() : u.to(at::kDouble).contiguous();
}

// The u inputs of every kernel: fp32 u (validity, sinusoids) and, for the other codes, the exact u.
void set_uniforms(NoiseGemmParams& p, const at::Tensor& u32, const at::Tensor& u64, NoiseCode code) {
  p.u = u32.const_data_ptr<float>();
  p.u64 = u64.defined() ? u64.const_data_ptr<double>() : nullptr;
  p.code = code;
}

NoiseGemmParams gemm_params(const at::Tensor& weight, const at::Tensor& freqs, const at::Tensor& u32,
                            const at::Tensor& u64, NoiseCode code, int64_t rows) {
  NoiseGemmParams p{};
  p.weight = weight.const_data_ptr();
  p.freqs = freqs.const_data_ptr<float>();
  set_uniforms(p, u32, u64, code);
  p.rows = rows;
  p.hidden = weight.size(0);
  p.num_freqs = weight.size(1) / 4;
  p.weight_stride = weight.stride(0);
  return p;
}

at::Tensor noise_embedding_cuda(const at::Tensor& u, const std::optional<at::Tensor>& tau, double tau_value,
                                const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                                c10::string_view code) {
  check_noise_embedding_args(u, tau, tau_value, weight_in, bias, kCudaWeightTypes);
  const NoiseCode u_code = parse_noise_code(code, "noise_embedding");
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const int64_t rows = u.size(0), f = weight.size(1) / 4;
  at::Tensor out = at::empty({rows, weight.size(0)}, weight.options());
  if (rows == 0) return out;
  const at::Tensor u32 = u.to(at::kFloat).contiguous(), freqs = frequencies(f, u.options());
  const at::Tensor u64 = exact_uniforms(u, u_code);
  NoiseGemmParams p = gemm_params(weight, freqs, u32, u64, u_code, rows);
  p.out = out.mutable_data_ptr();
  p.rows_per_seq = p.seq_rows = rows;
  at::Tensor bias32, tau32;
  if (tau.has_value()) {  // a temperature per row: the full K = 4F product
    tau32 = invalid_tau_to_nan(*tau).to(at::kFloat).contiguous();
    bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::zeros({weight.size(0)}, u.options().dtype(at::kFloat));
    p.tau = tau32.const_data_ptr<float>();
    p.k = 4 * f;
  } else {
    bias32 = folded_bias(at::full({1}, tau_value, u.options().dtype(at::kDouble)), weight, bias);
    p.k = 2 * f;
  }
  p.bias = bias32.const_data_ptr<float>();
  launch_noise_gemm(p, weight);
  return out;
}

// grad_W[:, :2F] (or [:, :4F] with per-row tau) = g^T features, deterministic split-M reduction.
at::Tensor weight_grad(const NoiseGemmParams& p, const at::Tensor& grad, int64_t rows_per_seq, int64_t seq_rows,
                       int64_t offset) {
  const int64_t splits = std::max<int64_t>(1, ceil_div(p.rows, kGradRowsPerSplit));
  at::Tensor partial = at::empty({splits, p.hidden, p.k}, grad.options().dtype(at::kFloat));
  if (p.rows > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(ceil_div(p.hidden, kSimtTile), ceil_div(p.k, kSimtTile), splits);
    KF_DISPATCH_FLOAT_HALF_BF16(grad.scalar_type(), "noise_weight_grad", [&] {
      weight_grad_kernel<scalar_t><<<grid, kSimtThreads, 0, stream>>>(
          p, grad.const_data_ptr<scalar_t>(), rows_per_seq, seq_rows, offset, partial.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    partial.zero_();
  }
  return partial.sum(0);
}

std::tuple<at::Tensor, std::optional<at::Tensor>> noise_embedding_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& u, const std::optional<at::Tensor>& tau, double tau_value,
    int64_t num_freqs, bool with_bias, c10::string_view code) {
  const NoiseCode u_code = parse_noise_code(code, "noise_embedding_backward");
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t rows = u.size(0), hidden = grad_out.size(1);
  const at::Tensor u32 = u.to(at::kFloat).contiguous(), freqs = frequencies(num_freqs, u.options());
  const at::Tensor u64 = exact_uniforms(u, u_code);
  NoiseGemmParams p{};
  p.freqs = freqs.const_data_ptr<float>();
  set_uniforms(p, u32, u64, u_code);
  p.rows = rows;
  p.hidden = hidden;
  p.num_freqs = num_freqs;
  at::Tensor tau32, grad_weight;
  const at::Tensor g_sum = grad_out.to(at::kFloat).sum(0);
  if (tau.has_value()) {
    tau32 = invalid_tau_to_nan(*tau).to(at::kFloat).contiguous();
    p.tau = tau32.const_data_ptr<float>();
    p.k = 4 * num_freqs;
    grad_weight = weight_grad(p, grad_out, rows, rows, 0);
  } else {
    p.k = 2 * num_freqs;
    const at::Tensor tau_grad = g_sum.unsqueeze(1) * tau_features(at::full({1}, tau_value, u.options().dtype(at::kDouble)), num_freqs);
    grad_weight = at::cat({weight_grad(p, grad_out, rows, rows, 0), tau_grad}, 1);
  }
  std::optional<at::Tensor> grad_bias;
  if (with_bias) grad_bias = g_sum.to(grad_out.scalar_type());
  return {grad_weight.to(grad_out.scalar_type()), grad_bias};
}

at::Tensor noise_conditioned_embedding_cuda(const at::Tensor& token_ids, const at::Tensor& token_table_in,
                                            const at::Tensor& u, const std::optional<at::Tensor>& tau,
                                            double tau_value, const at::Tensor& weight_in,
                                            const std::optional<at::Tensor>& bias, c10::string_view code) {
  check_noise_conditioned_args(token_ids, token_table_in, u, tau, tau_value, weight_in, bias, kCudaWeightTypes);
  const NoiseCode u_code = parse_noise_code(code, "noise_conditioned_embedding");
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const at::Tensor token_table = token_table_in.contiguous(), ids = token_ids.contiguous();
  const int64_t batch = ids.size(0), contexts = ids.size(1), hints = u.size(1), hidden = weight.size(0);
  const int64_t f = weight.size(1) / 4;
  at::Tensor out = at::empty({batch, contexts + hints, hidden}, weight.options());
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (contexts > 0) {
    KF_DISPATCH_FLOAT_HALF_BF16(weight.scalar_type(), "gather_tokens", [&] {
      AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "gather_tokens", [&] {
        gather_tokens_kernel<scalar_t, index_t><<<batch * contexts, 128, 0, stream>>>(
            ids.const_data_ptr<index_t>(), token_table.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            contexts, contexts + hints, token_table.size(0), hidden);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (hints == 0) return out;
  const at::Tensor u32 = u.to(at::kFloat).contiguous(), freqs = frequencies(f, u.options());
  const at::Tensor u64 = exact_uniforms(u, u_code);
  const at::Tensor sources =
      tau.has_value() ? invalid_tau_to_nan(*tau) : at::full({1}, tau_value, u.options().dtype(at::kDouble));
  const at::Tensor bias32 = folded_bias(sources, weight, bias);
  NoiseGemmParams p = gemm_params(weight, freqs, u32, u64, u_code, batch * hints);
  p.out = out.mutable_data_ptr();
  p.bias = bias32.const_data_ptr<float>();
  p.bias_per_seq = tau.has_value();
  p.k = 2 * f;
  p.rows_per_seq = hints;
  p.seq_rows = contexts + hints;
  p.seq_offset = contexts;
  launch_noise_gemm(p, weight);
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> noise_conditioned_embedding_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& token_ids, int64_t vocab, const at::Tensor& u,
    const std::optional<at::Tensor>& tau, double tau_value, int64_t num_freqs, bool with_bias,
    c10::string_view code) {
  const NoiseCode u_code = parse_noise_code(code, "noise_conditioned_embedding_backward");
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t batch = grad_out.size(0), contexts = token_ids.size(1), hints = u.size(1), hidden = grad_out.size(2);
  const at::Tensor g32 = grad_out.to(at::kFloat);
  at::Tensor grad_table = at::zeros({vocab, hidden}, g32.options());
  if (contexts > 0) {
    // An out-of-range id (its forward row was NaN) contributes nothing, and is never used as an index.
    const at::Tensor ids = token_ids.reshape(-1).to(at::kLong);
    const at::Tensor valid = ids.ge(0).logical_and(ids.lt(vocab));
    const at::Tensor rows = g32.narrow(1, 0, contexts).reshape({-1, hidden}) * valid.unsqueeze(1);
    grad_table.index_put_({ids.where(valid, 0)}, rows, /*accumulate=*/true);
  }
  const at::Tensor g_hints = g32.narrow(1, contexts, hints);
  const at::Tensor seq_sums = g_hints.sum(1);  // (B, H)
  const at::Tensor sources =
      tau.has_value() ? invalid_tau_to_nan(*tau) : at::full({1}, tau_value, u.options().dtype(at::kDouble));
  at::Tensor tau_feats = tau_features(sources, num_freqs).expand({batch, 2 * num_freqs});
  const at::Tensor tau_grad = seq_sums.t().mm(tau_feats);  // sum over sequences of g_sum_b outer features(tau_b)
  const at::Tensor u32 = u.to(at::kFloat).contiguous(), freqs = frequencies(num_freqs, u.options());
  const at::Tensor u64 = exact_uniforms(u, u_code);
  NoiseGemmParams p{};
  p.freqs = freqs.const_data_ptr<float>();
  set_uniforms(p, u32, u64, u_code);
  p.rows = batch * hints;
  p.hidden = hidden;
  p.num_freqs = num_freqs;
  p.k = 2 * num_freqs;
  const at::Tensor grad_weight = at::cat({weight_grad(p, grad_out, hints, contexts + hints, contexts), tau_grad}, 1);
  std::optional<at::Tensor> grad_bias;
  const auto type = grad_out.scalar_type();
  if (with_bias) grad_bias = seq_sums.sum(0).to(type);
  return {grad_table.to(type), grad_weight.to(type), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CUDA, m) {
  m.impl("noise_embedding", &noise_embedding_cuda);
  m.impl("noise_embedding_backward", &noise_embedding_backward_cuda);
  m.impl("noise_conditioned_embedding", &noise_conditioned_embedding_cuda);
  m.impl("noise_conditioned_embedding_backward", &noise_conditioned_embedding_backward_cuda);
}

}  // namespace kforcing::cuda
