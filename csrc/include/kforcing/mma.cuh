#pragma once
// Tensor-core helpers: mma.sync.m16n8k16 (bf16 or fp16 operands, fp32 accumulators) and its register fragments.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane = 4 * g + t;
// each 32-bit register holds two consecutive 16-bit elements:
//   A (16 x 16, m x k):  a[0] = (g, 2t..2t+1)   a[1] = (g+8, 2t..2t+1)   a[2] = (g, 2t+8..2t+9)   a[3] = (g+8, 2t+8..)
//   B (16 x 8,  k x n):  b[0] = (k = 2t..2t+1, n = g)   b[1] = (k = 2t+8..2t+9, n = g)
//   C (16 x 8,  m x n):  c[0], c[1] = (g, 2t), (g, 2t+1)   c[2], c[3] = (g+8, 2t), (g+8, 2t+1)
// Two C tiles side by side (16 x 16) hold exactly the elements of one A fragment, so softmax probabilities
// computed in registers feed the next mma without a trip through shared memory (FlashAttention-2's trick).

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

// mma.sync.m16n8k16 with bf16 or f16 operands needs sm_80. Device code for older architectures (sm_75 in the CI
// build) compiles the tensor-core kernels to a trap; the entry points send those GPUs to the CUDA-core kernels.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define KF_HAS_MMA_16816 1
#else
#define KF_HAS_MMA_16816 0
#endif

namespace kforcing::cuda::mma {

// The compute capability (major) from which the tensor-core kernels run.
constexpr int kMinMajor = 8;

template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack<c10::BFloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack<c10::Half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two 16-bit elements from different rows into one register (low half first).
__device__ __forceinline__ uint32_t pack_bits(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// c += a * b
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<c10::BFloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                          const uint32_t (&b)[2]) {
#if KF_HAS_MMA_16816
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // unreachable: the host never launches the tensor-core kernels below sm_80
#endif
}

template <>
__device__ __forceinline__ void mma_16816<c10::Half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if KF_HAS_MMA_16816
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // unreachable: the host never launches the tensor-core kernels below sm_80
#endif
}

// Fragments read from a row-major 16-bit tile in shared memory with `stride` elements per row.
// A fragment of the 16 x 16 block at (row0, col0).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* tile, int stride, int row0, int col0,
                                       int g, int t) {
  const uint16_t* p = tile + (row0 + g) * stride + col0 + 2 * t;
  a[0] = load_pair(p);
  a[1] = load_pair(p + 8 * stride);
  a[2] = load_pair(p + 8);
  a[3] = load_pair(p + 8 * stride + 8);
}

// A fragment of the transpose of the tile: element (m, k) = tile[col0 + k][row0 + m].
__device__ __forceinline__ void load_a_transposed(uint32_t (&a)[4], const uint16_t* tile, int stride, int row0,
                                                  int col0, int g, int t) {
  const uint16_t* p = tile + (col0 + 2 * t) * stride + row0 + g;
  a[0] = pack_bits(p[0], p[stride]);
  a[1] = pack_bits(p[8], p[stride + 8]);
  a[2] = pack_bits(p[8 * stride], p[9 * stride]);
  a[3] = pack_bits(p[8 * stride + 8], p[9 * stride + 8]);
}

// B fragment (k x n = 16 x 8) whose element (k, n) is tile[n0 + n][k0 + k]: "rows of the tile are the n index",
// e.g. K as the right operand of Q K^T.
__device__ __forceinline__ void load_b_rows_n(uint32_t (&b)[2], const uint16_t* tile, int stride, int n0, int k0,
                                              int g, int t) {
  const uint16_t* p = tile + (n0 + g) * stride + k0 + 2 * t;
  b[0] = load_pair(p);
  b[1] = load_pair(p + 8);
}

// B fragment whose element (k, n) is tile[k0 + k][n0 + n]: "rows of the tile are the k index", e.g. V in P V.
__device__ __forceinline__ void load_b_rows_k(uint32_t (&b)[2], const uint16_t* tile, int stride, int k0, int n0,
                                              int g, int t) {
  const uint16_t* p = tile + (k0 + 2 * t) * stride + n0 + g;
  b[0] = pack_bits(p[0], p[stride]);
  b[1] = pack_bits(p[8 * stride], p[9 * stride]);
}

// The A fragment (16 x 16) formed by two adjacent C tiles (16 x 8 each) of fp32 values.
template <typename T>
__device__ __forceinline__ void c_pair_to_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack<T>(left[0], left[1]);
  a[1] = pack<T>(left[2], left[3]);
  a[2] = pack<T>(right[0], right[1]);
  a[3] = pack<T>(right[2], right[3]);
}

}  // namespace kforcing::cuda::mma
