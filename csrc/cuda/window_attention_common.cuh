#pragma once
// Shared pieces of the CUDA window-attention kernels: launch parameters and warp reductions.

#include <cuda_runtime.h>

#include <cstdint>

#include "kforcing/attention.h"

namespace kforcing::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Inputs are contiguous (B, S, H, D) tensors; row (b, s, h) starts at ((b * S + s) * H + h) * D.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;       // backward: the forward output
  const void* grad_out;  // backward
  void* o;               // forward output / backward dq
  void* dk;
  void* dv;
  float* lse;      // (B, H, S), natural log
  float* delta;    // (B, H, S): rowsum(dO * O)
  float* dq_acc;   // (B, S, H, D) fp32 accumulator of the tensor-core backward
  WindowLayout layout;
  int64_t batch, heads, kv_heads, dim;
  float scale;

  __host__ __device__ int64_t seq() const { return layout.rows(); }
  __host__ __device__ int64_t group() const { return heads / kv_heads; }
  __host__ __device__ int64_t q_row(int64_t b, int64_t s, int64_t h) const { return ((b * seq() + s) * heads + h) * dim; }
  __host__ __device__ int64_t kv_row(int64_t b, int64_t s, int64_t h) const {
    return ((b * seq() + s) * kv_heads + h) * dim;
  }
  __host__ __device__ int64_t stat(int64_t b, int64_t h, int64_t s) const { return (b * heads + h) * seq() + s; }
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

}  // namespace kforcing::cuda
