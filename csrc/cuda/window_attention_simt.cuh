#pragma once
// window_attention on CUDA cores: every dtype (fp32, bf16, fp16) and any head_dim up to kSimtMaxDim. The
// tensor-core kernels (window_attention_mma.cuh) take bf16/fp16 with head_dim 64 or 128; these take the rest.
//
// Forward and dQ: one warp per query row. The row's visible keys (context 0..last_context, then its window's
// hints up to itself) are visited 32 at a time, one key per lane: a lane computes its key's score, the warp
// reduces max and sum (online softmax), and the value rows are accumulated with each lane owning head_dim / 32
// output columns. dK/dV: one warp per key row, visiting the query rows that see it (context rows from the key on,
// hint rows of the windows anchored at or after it, or the rest of its own window for a hint key) 32 at a time:
// no atomics, deterministic, each 32-row chunk summed apart before it joins the total (blocked summation, the
// accuracy of a GEMM's tiled sum). Delta = rowsum(dO * O) is computed once per row beforehand.

#include "window_attention_common.cuh"

namespace kforcing::cuda {

constexpr int kSimtWarps = 4;                // rows (or keys) per block, one per warp
constexpr int kSimtMaxDim = 256;             // head_dim limit of these kernels
constexpr int kDimsPerLane = kSimtMaxDim / 32;

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// Calls fn(first_key, count) for the keys row r sees, 32 at a time.
template <typename Fn>
__device__ __forceinline__ void for_each_key_chunk(const WindowLayout& layout, int64_t r, Fn&& fn) {
  const int64_t last = layout.last_context(r);
  for (int64_t k0 = 0; k0 <= last; k0 += 32) fn(k0, static_cast<int>(min(int64_t{32}, last + 1 - k0)));
  if (layout.is_hint(r)) {
    for (int64_t k0 = layout.window_start(r); k0 <= r; k0 += 32) {
      fn(k0, static_cast<int>(min(int64_t{32}, r + 1 - k0)));
    }
  }
}

// Loads one row of head_dim values (times `scale`) into a warp's fp32 buffer.
template <typename T>
__device__ __forceinline__ void load_row_to_shared(const T* row, int64_t dim, float scale, float* dst, int lane) {
  for (int64_t d = lane; d < dim; d += 32) dst[d] = to_float(row[d]) * scale;
  __syncwarp();
}

template <typename T>
__device__ __forceinline__ float dot_with_shared(const T* row, const float* shared, int64_t dim) {
  float acc = 0.f;
  for (int64_t d = 0; d < dim; ++d) acc += shared[d] * to_float(row[d]);
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) simt_forward_kernel(AttentionParams p) {
  __shared__ float q_s[kSimtWarps][kSimtMaxDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads, hk = h / p.group();
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kSimtWarps + warp;
  if (r >= p.seq()) return;  // the whole warp leaves; no block-wide barrier follows
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  load_row_to_shared(static_cast<const T*>(p.q) + p.q_row(b, r, h), p.dim, p.scale, q_s[warp], lane);

  float m = -INFINITY, l = 0.f, acc[kDimsPerLane] = {};
  for_each_key_chunk(p.layout, r, [&](int64_t k0, int n) {
    const float s = lane < n ? dot_with_shared(k + p.kv_row(b, k0 + lane, hk), q_s[warp], p.dim) : -INFINITY;
    const float m_new = fmaxf(m, warp_max(s));
    const float alpha = expf(m - m_new);  // 0 on the first chunk (m = -inf)
    const float e = lane < n ? expf(s - m_new) : 0.f;
    l = l * alpha + warp_sum(e);
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] *= alpha;
    for (int j = 0; j < n; ++j) {
      const float pj = __shfl_sync(kFullMask, e, j);
      const T* value = v + p.kv_row(b, k0 + j, hk);
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < p.dim) acc[i] += pj * to_float(value[d]);
      }
    }
    m = m_new;
  });
  T* out = static_cast<T*>(p.o) + p.q_row(b, r, h);
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < p.dim) out[d] = static_cast<T>(acc[i] / l);
  }
  if (lane == 0) p.lse[p.stat(b, h, r)] = m + logf(l);
}

// delta[b, h, r] = sum_d dO[b, r, h, d] * O[b, r, h, d]
template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) row_delta_kernel(AttentionParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kSimtWarps + warp;
  if (r >= p.seq()) return;
  const T* dout = static_cast<const T*>(p.grad_out) + p.q_row(b, r, h);
  const T* out = static_cast<const T*>(p.out) + p.q_row(b, r, h);
  float acc = 0.f;
  for (int64_t d = lane; d < p.dim; d += 32) acc += to_float(dout[d]) * to_float(out[d]);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[p.stat(b, h, r)] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) simt_dq_kernel(AttentionParams p) {
  __shared__ float q_s[kSimtWarps][kSimtMaxDim];
  __shared__ float do_s[kSimtWarps][kSimtMaxDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads, hk = h / p.group();
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kSimtWarps + warp;
  if (r >= p.seq()) return;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  load_row_to_shared(static_cast<const T*>(p.q) + p.q_row(b, r, h), p.dim, p.scale, q_s[warp], lane);
  load_row_to_shared(static_cast<const T*>(p.grad_out) + p.q_row(b, r, h), p.dim, 1.f, do_s[warp], lane);
  const float lse = p.lse[p.stat(b, h, r)], delta = p.delta[p.stat(b, h, r)];

  float acc[kDimsPerLane] = {};
  for_each_key_chunk(p.layout, r, [&](int64_t k0, int n) {
    float ds = 0.f;
    if (lane < n) {
      const float prob = expf(dot_with_shared(k + p.kv_row(b, k0 + lane, hk), q_s[warp], p.dim) - lse);
      ds = prob * (dot_with_shared(v + p.kv_row(b, k0 + lane, hk), do_s[warp], p.dim) - delta);
    }
    for (int j = 0; j < n; ++j) {
      const float dsj = __shfl_sync(kFullMask, ds, j);
      const T* key = k + p.kv_row(b, k0 + j, hk);
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < p.dim) acc[i] += dsj * to_float(key[d]);
      }
    }
  });
  T* dq = static_cast<T*>(p.o) + p.q_row(b, r, h);
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < p.dim) dq[d] = static_cast<T>(acc[i] * p.scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) simt_dkdv_kernel(AttentionParams p) {
  __shared__ float k_s[kSimtWarps][kSimtMaxDim];
  __shared__ float v_s[kSimtWarps][kSimtMaxDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x / p.kv_heads, hk = blockIdx.x % p.kv_heads;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kSimtWarps + warp;
  const WindowLayout& layout = p.layout;
  if (j >= p.seq()) return;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.grad_out);
  load_row_to_shared(static_cast<const T*>(p.k) + p.kv_row(b, j, hk), p.dim, p.scale, k_s[warp], lane);
  load_row_to_shared(static_cast<const T*>(p.v) + p.kv_row(b, j, hk), p.dim, 1.f, v_s[warp], lane);

  // The query rows that see key j, as up to two ranges.
  int64_t ranges[2][2] = {{0, 0}, {0, 0}};
  if (j < layout.context) {
    ranges[0][0] = j;
    ranges[0][1] = layout.context;
    if (j < layout.num_windows) {
      ranges[1][0] = layout.context + j * layout.window_size;
      ranges[1][1] = layout.rows();
    }
  } else {
    ranges[0][0] = j;
    ranges[0][1] = layout.window_start(j) + layout.window_size;
  }

  float dk[kDimsPerLane] = {}, dv[kDimsPerLane] = {};
  for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
    for (const auto& range : ranges) {
      for (int64_t r0 = range[0]; r0 < range[1]; r0 += 32) {
        const int n = static_cast<int>(min(int64_t{32}, range[1] - r0));
        float prob = 0.f, ds = 0.f;
        if (lane < n) {
          const int64_t r = r0 + lane;
          prob = expf(dot_with_shared(q + p.q_row(b, r, h), k_s[warp], p.dim) - p.lse[p.stat(b, h, r)]);
          ds = prob * (dot_with_shared(dout + p.q_row(b, r, h), v_s[warp], p.dim) - p.delta[p.stat(b, h, r)]);
        }
        // A chunk's 32 terms are summed on their own, then added to the total: a key seen by thousands of
        // (row, head) pairs would otherwise lose fp32 bits to one long running sum.
        float dk_chunk[kDimsPerLane] = {}, dv_chunk[kDimsPerLane] = {};
        for (int i = 0; i < n; ++i) {
          const float pi = __shfl_sync(kFullMask, prob, i), dsi = __shfl_sync(kFullMask, ds, i);
          const T* q_row = q + p.q_row(b, r0 + i, h);
          const T* do_row = dout + p.q_row(b, r0 + i, h);
#pragma unroll
          for (int c = 0; c < kDimsPerLane; ++c) {
            const int64_t d = lane + 32 * c;
            if (d < p.dim) {
              dv_chunk[c] += pi * to_float(do_row[d]);
              dk_chunk[c] += dsi * to_float(q_row[d]);
            }
          }
        }
#pragma unroll
        for (int c = 0; c < kDimsPerLane; ++c) {
          dk[c] += dk_chunk[c];
          dv[c] += dv_chunk[c];
        }
      }
    }
  }
  T* dk_out = static_cast<T*>(p.dk) + p.kv_row(b, j, hk);
  T* dv_out = static_cast<T*>(p.dv) + p.kv_row(b, j, hk);
#pragma unroll
  for (int c = 0; c < kDimsPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < p.dim) {
      dk_out[d] = static_cast<T>(dk[c] * p.scale);
      dv_out[d] = static_cast<T>(dv[c]);
    }
  }
}

}  // namespace kforcing::cuda
