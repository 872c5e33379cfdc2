// window_attention_decode, CUDA kernels: T new rows per sequence against a preallocated KV cache.
//
// Semantics: kforcing_ops/attention.py. The keys of sequence b form one virtual sequence, [cache rows 0..len_b) then
// [new rows 0..T); new row j sees cache rows and new rows 0..j.
//   decode_kernel   grid = (batch * kv_heads * row_groups, splits). A block takes the T x G rows (G query heads
//                   share a kv head) of one (batch, kv head), up to kDecodeRows of them, so each K/V tile is read
//                   from memory once per kv head; it walks its split of the virtual key sequence in tiles of
//                   kDecodeKeys keys staged in shared memory (16-byte loads), one warp per row, one key per lane
//                   for the scores, online softmax, each lane owning head_dim / 32 output columns. Splitting the
//                   keys over blocks fills the GPU when batch * kv_heads is small.
//   merge_kernel    combines the splits' (max, sum, output) partials when there is more than one split.
// The block of split 0 also appends the first n_commit new K/V rows to the cache at [len_b, len_b + n_commit); no
// other block touches those rows (the others read cache rows below len_b, and new keys from k_new). A sequence
// with len_b < 0 or len_b + n_commit > L_max writes nothing and gets NaN outputs: the documented overflow signal,
// since raising would need a host sync. Split counts depend on shapes only, so a step can be graph-captured. The
// kernels read a private copy of the lengths, taken before the launch, so the cache append cannot change them.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "kforcing/attention.h"
#include "kforcing/cuda_utils.cuh"
#include "kforcing/dispatch.h"
#include "window_attention_common.cuh"

namespace kforcing::cuda {
namespace {

constexpr const char* kOp = "window_attention_decode";
constexpr int kDecodeWarps = 8;
constexpr int kDecodeRows = 32;              // rows (new rows x query heads) per block; more take more blocks
constexpr int kRowsPerWarp = kDecodeRows / kDecodeWarps;
constexpr int kDecodeKeys = 64;              // keys per shared-memory tile (two per lane)
constexpr int kStageBatch = 8;               // global loads each thread issues before storing them
constexpr int kDecodeMaxDim = 256;
constexpr int kMinKeysPerSplit = 512;        // a split below this is not worth its merge
constexpr int kBlocksPerSm = 2;              // split until the grid reaches this many blocks per SM

struct DecodeParams {
  const void *q, *k_new, *v_new;
  void *k_cache, *v_cache, *out;
  const int32_t* lengths;
  float* partial;       // (splits, batch, heads, T, dim + 2): output, then max and sum
  int64_t q_stride[3];  // batch, row, head (dim contiguous), also used for out
  int64_t new_stride[3], cache_stride[3];
  int64_t batch, new_rows, heads, kv_heads, dim, max_len, n_commit, row_groups, splits;
  float scale;

  __device__ int64_t group() const { return heads / kv_heads; }
};

template <int kDims>
struct RowState {
  float m = -INFINITY, l = 0.f, acc[kDims] = {};
};

// Virtual key i of sequence b: a cache row below len, else a new row.
template <typename T>
__device__ __forceinline__ const T* key_row(const DecodeParams& p, const void* cache, const void* fresh, int64_t b,
                                            int64_t hk, int64_t len, int64_t i) {
  if (i < len) {
    return static_cast<const T*>(cache) + b * p.cache_stride[0] + i * p.cache_stride[1] + hk * p.cache_stride[2];
  }
  return static_cast<const T*>(fresh) + b * p.new_stride[0] + (i - len) * p.new_stride[1] + hk * p.new_stride[2];
}

template <typename T, int kDims>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_kernel(DecodeParams p) {
  extern __shared__ float shared[];
  const int64_t dim = p.dim, padded = dim + 1;  // +1: lanes read different key rows without bank conflicts
  float* q_s = shared;                          // (kDecodeRows, dim)
  float* k_s = q_s + kDecodeRows * dim;         // (kDecodeKeys, dim + 1)
  float* v_s = k_s + kDecodeKeys * padded;      // (kDecodeKeys, dim)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t group = p.group(), rows = p.new_rows * group;
  const int64_t row_group = blockIdx.x % p.row_groups, bh = blockIdx.x / p.row_groups;
  const int64_t b = bh / p.kv_heads, hk = bh % p.kv_heads, split = blockIdx.y;
  const int64_t len = p.lengths[b];
  const bool overflow = len < 0 || len + p.n_commit > p.max_len;
  const int64_t first_row = row_group * kDecodeRows, block_rows = min(int64_t{kDecodeRows}, rows - first_row);

  // Row r of the block: new row j = (first_row + r) / G, query head hk * G + (first_row + r) % G.
  for (int64_t i = threadIdx.x; i < block_rows * dim; i += blockDim.x) {
    const int64_t r = first_row + i / dim, d = i % dim;
    const T* src = static_cast<const T*>(p.q) + b * p.q_stride[0] + (r / group) * p.q_stride[1] +
                   (hk * group + r % group) * p.q_stride[2];
    q_s[i] = static_cast<float>(src[d]) * p.scale;
  }

  const int64_t total = overflow ? 0 : len + p.new_rows;
  const int64_t per_split = ceil_div(ceil_div(total, p.splits), kDecodeKeys) * kDecodeKeys;
  const int64_t key_begin = min(total, split * per_split), key_end = min(total, key_begin + per_split);
  RowState<kDims> state[kRowsPerWarp];

  for (int64_t k0 = key_begin; k0 < key_end; k0 += kDecodeKeys) {
    const int64_t n = min(int64_t{kDecodeKeys}, key_end - k0);
    __syncthreads();  // q_s written / previous tile read
    // kStageBatch loads in flight per thread before the first store: staging is bound by memory latency.
    for (int64_t base = threadIdx.x; base < n * dim; base += kStageBatch * blockDim.x) {
      float keys[kStageBatch], values[kStageBatch];
#pragma unroll
      for (int s = 0; s < kStageBatch; ++s) {
        const int64_t i = base + s * blockDim.x, j = i / dim, d = i % dim;
        if (i < n * dim) {
          keys[s] = static_cast<float>(key_row<T>(p, p.k_cache, p.k_new, b, hk, len, k0 + j)[d]);
          values[s] = static_cast<float>(key_row<T>(p, p.v_cache, p.v_new, b, hk, len, k0 + j)[d]);
        }
      }
#pragma unroll
      for (int s = 0; s < kStageBatch; ++s) {
        const int64_t i = base + s * blockDim.x, j = i / dim, d = i % dim;
        if (i < n * dim) {
          k_s[j * padded + d] = keys[s];
          v_s[j * dim + d] = values[s];
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t r = warp + rr * kDecodeWarps;
      if (r >= block_rows) break;
      const int64_t visible_end = len + (first_row + r) / group + 1;  // cache + new rows 0..j
      float s[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t j = lane + 32 * half;
        s[half] = -INFINITY;
        if (j < n && k0 + j < visible_end) {
          float dot = 0.f;
          for (int64_t d = 0; d < dim; ++d) dot += q_s[r * dim + d] * k_s[j * padded + d];
          s[half] = dot;
        }
      }
      RowState<kDims>& row = state[rr];
      const float m_new = fmaxf(row.m, warp_max(fmaxf(s[0], s[1])));
      if (m_new == -INFINITY) continue;  // nothing visible in this tile yet
      const float alpha = expf(row.m - m_new);
      const float e[2] = {expf(s[0] - m_new), expf(s[1] - m_new)};
      row.l = row.l * alpha + warp_sum(e[0] + e[1]);
#pragma unroll
      for (int c = 0; c < kDims; ++c) row.acc[c] *= alpha;
      for (int j = 0; j < n; ++j) {
        const float pj = __shfl_sync(kFullMask, j < 32 ? e[0] : e[1], j % 32);
#pragma unroll
        for (int c = 0; c < kDims; ++c) {
          const int64_t d = lane + 32 * c;
          if (d < dim) row.acc[c] += pj * v_s[j * dim + d];
        }
      }
      row.m = m_new;
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = warp + rr * kDecodeWarps;
    if (r >= block_rows) break;
    const int64_t row = first_row + r, j_new = row / group, h = hk * group + row % group;
    const RowState<kDims>& st = state[rr];
    if (p.splits == 1) {
      T* dst = static_cast<T*>(p.out) + b * p.q_stride[0] + j_new * p.q_stride[1] + h * p.q_stride[2];
#pragma unroll
      for (int c = 0; c < kDims; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < dim) dst[d] = static_cast<T>(overflow ? NAN : st.acc[c] / st.l);
      }
    } else {
      float* dst = p.partial + (((split * p.batch + b) * p.heads + h) * p.new_rows + j_new) * (dim + 2);
#pragma unroll
      for (int c = 0; c < kDims; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < dim) dst[d] = st.acc[c];
      }
      if (lane == 0) {
        dst[dim] = st.m;
        dst[dim + 1] = st.l;
      }
    }
  }

  if (split == 0 && row_group == 0 && !overflow) {
    for (int64_t i = threadIdx.x; i < p.n_commit * dim; i += blockDim.x) {
      const int64_t j = i / dim, d = i % dim;
      const int64_t src = b * p.new_stride[0] + j * p.new_stride[1] + hk * p.new_stride[2] + d;
      const int64_t dst = b * p.cache_stride[0] + (len + j) * p.cache_stride[1] + hk * p.cache_stride[2] + d;
      static_cast<T*>(p.k_cache)[dst] = static_cast<const T*>(p.k_new)[src];
      static_cast<T*>(p.v_cache)[dst] = static_cast<const T*>(p.v_new)[src];
    }
  }
}

// One warp per (batch, head, new row): out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
template <typename T>
__global__ void __launch_bounds__(kDecodeWarps * 32) merge_kernel(DecodeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDecodeWarps + warp;  // over (batch, heads, new_rows)
  if (row >= p.batch * p.heads * p.new_rows) return;
  const int64_t j = row % p.new_rows, h = (row / p.new_rows) % p.heads, b = row / (p.new_rows * p.heads);
  const int64_t stride = p.batch * p.heads * p.new_rows * (p.dim + 2);
  const float* part = p.partial + row * (p.dim + 2);
  const int64_t len = p.lengths[b];
  const bool overflow = len < 0 || len + p.n_commit > p.max_len;
  float m = -INFINITY;
  for (int64_t s = 0; s < p.splits; ++s) m = fmaxf(m, part[s * stride + p.dim]);
  float l = 0.f;
  for (int64_t s = 0; s < p.splits; ++s) {
    const float ms = part[s * stride + p.dim];
    if (ms > -INFINITY) l += part[s * stride + p.dim + 1] * expf(ms - m);
  }
  T* dst = static_cast<T*>(p.out) + b * p.q_stride[0] + j * p.q_stride[1] + h * p.q_stride[2];
  for (int64_t d = lane; d < p.dim; d += 32) {
    float acc = 0.f;
    for (int64_t s = 0; s < p.splits; ++s) {
      const float ms = part[s * stride + p.dim];
      if (ms > -INFINITY) acc += part[s * stride + d] * expf(ms - m);
    }
    dst[d] = static_cast<T>(overflow ? NAN : acc / l);
  }
}

int64_t choose_splits(int64_t blocks, int64_t max_keys) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = ceil_div(kBlocksPerSm * sms, blocks);
  return std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, max_keys / kMinKeysPerSplit));
}

at::Tensor window_attention_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                        int64_t n_commit, double scale) {
  check_decode_args(q_in, k_new_in, v_new_in, k_cache, v_cache, cache_seqlens, n_commit,
                    {at::kFloat, at::kBFloat16, at::kHalf});
  KF_CHECK_VALUE(q_in.size(3) <= kDecodeMaxDim, kOp, "head_dim ", q_in.size(3), " is above the CUDA kernel's limit of ",
                 kDecodeMaxDim);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k_new = k_new_in.contiguous(), v_new = v_new_in.contiguous();
  // A private copy of the lengths (device to device, no sync): the kernels read them after the cache append
  // has started, and the tensor may share memory with a cache.
  const at::Tensor lengths = cache_seqlens.clone(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0) return out;
  KF_CHECK_VALUE(k_cache.strides() == v_cache.strides(), kOp, "`k_cache` and `v_cache` must have one layout");

  DecodeParams p{};
  p.q = q.const_data_ptr();
  p.k_new = k_new.const_data_ptr();
  p.v_new = v_new.const_data_ptr();
  p.k_cache = k_cache.mutable_data_ptr();
  p.v_cache = v_cache.mutable_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lengths = lengths.const_data_ptr<int32_t>();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.new_stride[i] = k_new.stride(i);
    p.cache_stride[i] = k_cache.stride(i);
  }
  p.batch = q.size(0);
  p.new_rows = q.size(1);
  p.heads = q.size(2);
  p.kv_heads = k_new.size(2);
  p.dim = q.size(3);
  p.max_len = k_cache.size(1);
  p.n_commit = n_commit;
  p.scale = static_cast<float>(scale);
  p.row_groups = ceil_div(p.new_rows * (p.heads / p.kv_heads), kDecodeRows);
  const int64_t blocks = p.batch * p.kv_heads * p.row_groups;
  p.splits = choose_splits(blocks, p.max_len + p.new_rows);
  at::Tensor partial;
  if (p.splits > 1) {
    partial = at::empty({p.splits, p.batch, p.heads, p.new_rows, p.dim + 2}, q.options().dtype(at::kFloat));
    p.partial = partial.mutable_data_ptr<float>();
  }
  const size_t smem = (kDecodeRows * p.dim + kDecodeKeys * (p.dim + 1) + kDecodeKeys * p.dim) * sizeof(float);
  // About 0.6 KB per head_dim: head_dim >= 160 needs more than the 99 KB of sm_86 / sm_89.
  const size_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  KF_CHECK_VALUE(smem <= smem_limit, kOp, "head_dim ", p.dim, " needs ", smem, " bytes of shared memory, above this ",
                 "GPU's limit of ", smem_limit, " (the largest head_dim it supports is ",
                 (smem_limit / sizeof(float) - kDecodeKeys) / (kDecodeRows + 2 * kDecodeKeys), ")");
  const auto stream = at::cuda::getCurrentCUDAStream();
  KF_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "window_attention_decode_cuda", [&] {
    auto launch = [&](auto kernel) {
      if (smem > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      }
      kernel<<<dim3(blocks, p.splits), kDecodeWarps * 32, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (p.dim <= 128) {
      launch(decode_kernel<scalar_t, 4>);
    } else {
      launch(decode_kernel<scalar_t, 8>);
    }
    if (p.splits > 1) {
      const int64_t merge_blocks = ceil_div(p.batch * p.heads * p.new_rows, kDecodeWarps);
      merge_kernel<scalar_t><<<merge_blocks, kDecodeWarps * 32, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CUDA, m) { m.impl("window_attention_decode", &window_attention_decode_cuda); }

}  // namespace kforcing::cuda
