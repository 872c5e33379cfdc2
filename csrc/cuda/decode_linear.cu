// decode_linear, CUDA kernel: y = x @ W^T + b for the few rows of a decode step, streaming W once.
//
// Semantics: kforcing_ops/linear.py. At decode batch sizes a linear layer is a read of W: cuBLAS picks GEMM tiles
// made for many rows. Here one warp owns one output n and reads W's row n once with 16-byte loads (4 fp32 or
// 8 bf16 weights per lane per step), FMAing each weight into the partial sums of up to kRowsPerCta rows of x
// (x is small and stays in L1/L2; each row's matching elements are one or two vector loads, not kVec scalar
// ones, which would make a multi-row call bound by load instructions rather than by W's bytes). Lane l's partial
// sum of (row m, output n) walks k = 16-byte step s * 32 + l, element j ascending; then a fixed xor-butterfly over
// the 32 lanes sums them, and + bias.
//
// Row invariance: that chain depends only on (m, n) and K, never on how many rows the call has, which CTA row
// chunk m falls in or how many rows that chunk holds, so a row's output is bitwise the same in any call. Calls
// with more than kRowsPerCta rows split the rows over gridDim.y and read W once per chunk.
//
// Grid: (ceil(N / kWarps), ceil(M / kRowsPerCta)), kWarps warps per CTA. No host sync, no allocation beyond the
// output (and an fp32 copy of a bias of another dtype), so the op can be captured in a CUDA graph.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "kforcing/cuda_utils.cuh"
#include "kforcing/linear.h"

namespace kforcing::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerCta = 16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// Loads the N elements at p (8, 16 or 32 bytes, p aligned to min(that, 16)) in one or two vector loads.
template <int N, typename T>
__device__ __forceinline__ void load_vector(const T* p, T (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static_assert(kBytes == 8 || kBytes == 16 || kBytes == 32, "8, 16 or 32 bytes");
  if constexpr (kBytes == 8) {
    const uint2 bits = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(out, &bits, sizeof(bits));
  } else {
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p) + q);
      memcpy(reinterpret_cast<char*>(out) + 16 * q, &bits, sizeof(bits));
    }
  }
}

// ROWS: the rows this CTA holds partial sums for (a power of two >= the rows it has, <= kRowsPerCta); rows past
// M are computed on nothing and never written. kVec: W elements per 16-byte load.
template <int ROWS, typename XT, typename WT>
__global__ void __launch_bounds__(kWarps * 32)
    decode_linear_kernel(const XT* __restrict__ x, const WT* __restrict__ w, int64_t ldw,
                         const float* __restrict__ bias, XT* __restrict__ y, int64_t m, int64_t n, int64_t k,
                         bool vector_loads, bool x_vector_loads) {
  constexpr int kVec = 16 / sizeof(WT);
  const int lane = threadIdx.x % 32;
  const int64_t out = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRowsPerCta;
  if (out >= n) return;
  const int rows = m - row0 < ROWS ? static_cast<int>(m - row0) : ROWS;
  const WT* w_row = w + out * ldw;
  const XT* x_rows = x + row0 * k;
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  for (int64_t base = static_cast<int64_t>(lane) * kVec; base < k; base += 32 * kVec) {
    WT wv[kVec];
    if (vector_loads && base + kVec <= k) {
      const uint4 bits = __ldg(reinterpret_cast<const uint4*>(w_row + base));
      memcpy(wv, &bits, sizeof(bits));
    } else {  // the K tail, or a W whose rows are not 16-byte aligned: the same elements, one at a time
#pragma unroll
      for (int j = 0; j < kVec; ++j) wv[j] = base + j < k ? w_row[base + j] : WT(0);
    }
    const bool full = vector_loads && base + kVec <= k;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < rows) {
        const XT* xr = x_rows + r * k + base;
        XT xv[kVec];
        if (full && x_vector_loads) {
          load_vector(xr, xv);
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) xv[j] = base + j < k ? xr[j] : XT(0);
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (base + j < k) acc[r] = fmaf(to_float(xv[j]), to_float(wv[j]), acc[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
  }
  if (lane == 0) {
    const float b = bias ? bias[out] : 0.f;
    for (int r = 0; r < rows; ++r) y[(row0 + r) * n + out] = static_cast<XT>(bias ? acc[r] + b : acc[r]);
  }
}

template <typename XT, typename WT>
void launch(const at::Tensor& x, const at::Tensor& weight, const float* bias, at::Tensor& out, int64_t m) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const bool vector_loads = reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % 16 == 0 &&
                            (weight.stride(0) * static_cast<int64_t>(sizeof(WT))) % 16 == 0;
  // x's rows (contiguous, k apart) start 16-byte aligned: each lane's kVec elements are one or two vector loads.
  const bool x_vector_loads = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                              (k * static_cast<int64_t>(sizeof(XT))) % 16 == 0;
  const dim3 grid(ceil_div(n, kWarps), ceil_div(m, kRowsPerCta));
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto rows_tag) {
    constexpr int kRows = decltype(rows_tag)::value;
    decode_linear_kernel<kRows, XT, WT><<<grid, kWarps * 32, 0, stream>>>(
        x.const_data_ptr<XT>(), weight.const_data_ptr<WT>(), weight.stride(0), bias, out.mutable_data_ptr<XT>(), m,
        n, k, vector_loads, x_vector_loads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // The smallest row count that holds a CTA's rows: fewer registers and no idle FMAs at M = 1..8.
  if (m <= 1) {
    go(std::integral_constant<int, 1>{});
  } else if (m <= 2) {
    go(std::integral_constant<int, 2>{});
  } else if (m <= 4) {
    go(std::integral_constant<int, 4>{});
  } else if (m <= 8) {
    go(std::integral_constant<int, 8>{});
  } else {
    go(std::integral_constant<int, kRowsPerCta>{});
  }
}

at::Tensor decode_linear_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                              const c10::optional<at::Tensor>& bias) {
  const int64_t m = check_decode_linear_args(x_in, weight_in, bias, {at::kFloat, at::kBFloat16});
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t k = weight_in.size(1), n = weight_in.size(0);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x_in.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor x = x_in.reshape({m, k}).contiguous();
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr;
  const bool x_bf16 = x.scalar_type() == at::kBFloat16, w_bf16 = weight.scalar_type() == at::kBFloat16;
  if (x_bf16 && w_bf16) {
    launch<c10::BFloat16, c10::BFloat16>(x, weight, bias_ptr, out, m);
  } else if (x_bf16) {
    launch<c10::BFloat16, float>(x, weight, bias_ptr, out, m);
  } else if (w_bf16) {
    launch<float, c10::BFloat16>(x, weight, bias_ptr, out, m);
  } else {
    launch<float, float>(x, weight, bias_ptr, out, m);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CUDA, m) { m.impl("decode_linear", &decode_linear_cuda); }

}  // namespace kforcing::cuda
