#pragma once
// Small device helpers shared by the CUDA kernels.

#include <cuda_runtime.h>

#include <cstdint>

namespace kforcing::cuda {

// Reduction functors for cub (cub::Min/Max moved between CCCL versions; these work with all of them).
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const { return b < a ? b : a; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const { return a < b ? b : a; }
};

// 16-byte packs for vectorised global loads.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// A monotone map from float to uint32 (x < y  <=>  key(x) < key(y)); -0 and +0 share a key.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.f ? 0.f : x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kforcing::cuda
