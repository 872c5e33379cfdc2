#pragma once
// window_attention on tensor cores (mma.sync m16n8k16): bf16 / fp16, head_dim 64 or 128, FlashAttention-2 style.
//
// Tiles: kMmaRows query rows x kMmaKeys keys per step, 4 warps, 16 query rows (forward) or 16 keys (backward) per
// warp. The staircase decides which tiles exist (kforcing/attention.h): a query block visits the context key
// tiles up to its largest last_context, then the hint tiles of its own windows; a tile is masked element by
// element only where some row of the block does not see all of it, so all but the diagonal-like tiles run
// unmasked. Nothing of size S x S is formed.
//
// Forward (grid: batch*heads x query blocks, the heavier blocks launched first): Q fragments are read once from
// global memory into registers; per key tile, K and V are staged in shared memory (rows padded by kPad elements,
// so fragment loads are free of bank conflicts), S = Q K^T by mma, online softmax in registers (exp2 with the
// scale folded in), and the probabilities feed P V directly as A fragments. Writes O and lse.
// Backward (grid: batch*kv_heads x key tiles): a block owns one key tile of one kv head and visits every query
// tile, of every query head of the group, that sees it. It forms S^T = K Q^T and dP^T = V dO^T (keys as rows, so
// P^T and dS^T = P^T (dP^T - Delta) are A fragments in registers), accumulates dV += P^T dO and dK += dS^T Q in
// registers, and adds dQ += dS K (dS^T staged through shared memory) to an fp32 buffer with atomics.

#include "kforcing/mma.cuh"
#include "window_attention_common.cuh"

namespace kforcing::cuda {

constexpr int kMmaRows = 64;   // query rows per block / per query tile
constexpr int kMmaKeys = 64;   // keys per key tile
constexpr int kMmaWarps = 4;
constexpr int kPad = 8;        // shared-memory row padding, in 16-bit elements

template <int D>
constexpr int kTileStride = D + kPad;
constexpr int kDsStride = kMmaRows + kPad;

template <int D>
constexpr size_t mma_forward_smem() {
  return 2 * kMmaKeys * kTileStride<D> * sizeof(uint16_t);
}

template <int D>
constexpr size_t mma_backward_smem() {
  return (4 * kMmaKeys * kTileStride<D> + kMmaKeys * kDsStride) * sizeof(uint16_t) + 2 * kMmaRows * sizeof(float);
}

// What the query rows [r0, r1) see: context keys [0, context_end) (min_context: the smallest last_context among
// them) and hint keys [hint_begin, hint_end).
struct BlockKeys {
  int64_t context_end = 0, min_context = INT64_MAX, hint_begin = 0, hint_end = 0;
};

__device__ __forceinline__ BlockKeys keys_of_rows(const WindowLayout& layout, int64_t r0, int64_t r1) {
  BlockKeys keys;
  if (r0 < layout.context) {
    keys.context_end = min(r1, layout.context);
    keys.min_context = r0;
  }
  if (r1 > layout.context) {
    const int64_t first_hint = max(r0, layout.context);
    keys.context_end = max(keys.context_end, layout.window(r1 - 1) + 1);
    keys.min_context = min(keys.min_context, layout.window(first_hint));
    keys.hint_begin = layout.window_start(first_hint);
    keys.hint_end = layout.window_start(r1 - 1) + layout.window_size;
  }
  return keys;
}

// Copies rows [first, first + kMmaKeys) of a (B, S, heads, D) tensor (row r at base + row_offset(r)) into a padded
// shared tile; rows at or past `end` are zero.
template <int D, typename RowOffset>
__device__ __forceinline__ void stage_rows(uint16_t* tile, const uint16_t* base, int64_t first, int64_t end,
                                           RowOffset row_offset) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < kMmaKeys * kChunks; i += kMmaWarps * 32) {
    const int row = i / kChunks, chunk = i % kChunks;
    const int64_t r = first + row;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (r < end) value = *reinterpret_cast<const uint4*>(base + row_offset(r) + chunk * 8);
    *reinterpret_cast<uint4*>(tile + row * kTileStride<D> + chunk * 8) = value;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaWarps * 32) mma_forward_kernel(AttentionParams p) {
  extern __shared__ __align__(16) uint16_t smem[];
  constexpr int kStride = kTileStride<D>;
  uint16_t* k_s = smem;
  uint16_t* v_s = smem + kMmaKeys * kStride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t seq = p.seq();
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads, hk = h / p.group();
  const int64_t block = gridDim.y - 1 - blockIdx.y;  // later blocks see more keys: launch them first
  const int64_t r0 = block * kMmaRows, r1 = min(r0 + kMmaRows, seq);
  const int64_t rows[2] = {r0 + warp * 16 + g, r0 + warp * 16 + g + 8};
  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);

  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = rows[i % 2];
      const int col = kk * 16 + 2 * t + (i / 2) * 8;
      q_frag[kk][i] = r < seq ? mma::load_pair(q + p.q_row(b, r, h) + col) : 0u;
    }
  }
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  auto kv_offset = [&](int64_t r) { return p.kv_row(b, r, hk); };

  auto attend_tile = [&](int64_t k0, int64_t k_end, bool masked) {
    __syncthreads();  // the previous tile is no longer read
    stage_rows<D>(k_s, k, k0, k_end, kv_offset);
    stage_rows<D>(v_s, v, k0, k_end, kv_offset);
    __syncthreads();
    float s[kMmaKeys / 8][4] = {};
#pragma unroll
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kb[2];
        mma::load_b_rows_n(kb, k_s, kStride, nt * 8, kk * 16, g, t);
        mma::mma_16816<T>(s[nt], q_frag[kk], kb);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t key = k0 + nt * 8 + 2 * t + (i & 1), r = rows[i / 2];
        const bool visible = !masked || (key < k_end && r < seq && p.layout.visible(r, key));
        s[nt][i] = visible ? s[nt][i] * scale_log2 : -INFINITY;
      }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
      const float m_new = fmaxf(m[rr], tile_max);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen no key yet stays at zero
      const float alpha = exp2f(m[rr] - base);
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float e = exp2f(s[nt][2 * rr + c] - base);
          s[nt][2 * rr + c] = e;
          sum += e;
        }
      }
      l[rr] = l[rr] * alpha + sum;
      m[rr] = m_new;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * rr] *= alpha;
        o[dt][2 * rr + 1] *= alpha;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
      uint32_t p_frag[4];
      mma::c_pair_to_a<T>(p_frag, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t vb[2];
        mma::load_b_rows_k(vb, v_s, kStride, kk * 16, dt * 8, g, t);
        mma::mma_16816<T>(o[dt], p_frag, vb);
      }
    }
  };

  const BlockKeys keys = keys_of_rows(p.layout, r0, r1);
  for (int64_t k0 = 0; k0 < keys.context_end; k0 += kMmaKeys) {
    attend_tile(k0, keys.context_end, k0 + kMmaKeys - 1 > keys.min_context);
  }
  for (int64_t k0 = keys.hint_begin; k0 < keys.hint_end; k0 += kMmaKeys) attend_tile(k0, keys.hint_end, true);

  uint16_t* out = static_cast<uint16_t*>(p.o);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float total = l[rr];
    total += __shfl_xor_sync(kFullMask, total, 1);
    total += __shfl_xor_sync(kFullMask, total, 2);
    const int64_t r = rows[rr];
    if (r >= seq) continue;
    const float inv = 1.f / total;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + p.q_row(b, r, h) + dt * 8 + 2 * t) =
          mma::pack<T>(o[dt][2 * rr] * inv, o[dt][2 * rr + 1] * inv);
    }
    if (t == 0) p.lse[p.stat(b, h, r)] = m[rr] * kLn2 + logf(total);
  }
}

// Whether query tile `tile` holds a row that sees some key of [c0, c1).
__device__ __forceinline__ bool tile_sees_keys(const WindowLayout& layout, int64_t tile, int64_t c0, int64_t c1) {
  const int64_t q0 = tile * kMmaRows, q1 = min(q0 + kMmaRows, layout.rows());
  auto overlaps = [&](int64_t a, int64_t z) { return a < z && q0 < z && a < q1; };
  bool sees = false;
  if (c0 < layout.context) {
    sees |= overlaps(c0, layout.context);  // context rows at or after the key
    if (c0 < layout.num_windows) sees |= overlaps(layout.context + c0 * layout.window_size, layout.rows());
  }
  if (c1 > layout.context) {  // hint keys: rows of their own windows
    const int64_t first = max(c0, layout.context);
    sees |= overlaps(layout.window_start(first), layout.window_start(c1 - 1) + layout.window_size);
  }
  return sees;
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaWarps * 32) mma_backward_kernel(AttentionParams p) {
  extern __shared__ __align__(16) uint16_t smem[];
  constexpr int kStride = kTileStride<D>;
  uint16_t* k_s = smem;
  uint16_t* v_s = k_s + kMmaKeys * kStride;
  uint16_t* q_s = v_s + kMmaKeys * kStride;
  uint16_t* do_s = q_s + kMmaRows * kStride;
  uint16_t* ds_s = do_s + kMmaRows * kStride;  // dS^T: (keys, query rows)
  float* lse_s = reinterpret_cast<float*>(ds_s + kMmaKeys * kDsStride);  // log2 units
  float* delta_s = lse_s + kMmaRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const WindowLayout& layout = p.layout;
  const int64_t seq = p.seq();
  const int64_t b = blockIdx.x / p.kv_heads, hk = blockIdx.x % p.kv_heads;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kMmaKeys, c1 = min(c0 + kMmaKeys, seq);
  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* dout = static_cast<const uint16_t*>(p.grad_out);
  const float scale_log2 = p.scale * kLog2e;

  stage_rows<D>(k_s, static_cast<const uint16_t*>(p.k), c0, c1, [&](int64_t r) { return p.kv_row(b, r, hk); });
  stage_rows<D>(v_s, static_cast<const uint16_t*>(p.v), c0, c1, [&](int64_t r) { return p.kv_row(b, r, hk); });
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const int key_rows[2] = {warp * 16 + g, warp * 16 + g + 8};  // this thread's keys, tile-local
  const int64_t query_tiles = (seq + kMmaRows - 1) / kMmaRows;

  for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
    for (int64_t tile = 0; tile < query_tiles; ++tile) {
      if (!tile_sees_keys(layout, tile, c0, c1)) continue;
      const int64_t q0 = tile * kMmaRows, q1 = min(q0 + kMmaRows, seq);
      __syncthreads();  // the previous query tile is no longer read
      stage_rows<D>(q_s, q, q0, q1, [&](int64_t r) { return p.q_row(b, r, h); });
      stage_rows<D>(do_s, dout, q0, q1, [&](int64_t r) { return p.q_row(b, r, h); });
      for (int i = threadIdx.x; i < kMmaRows; i += kMmaWarps * 32) {
        const bool valid = q0 + i < q1;  // an lse of +inf makes a padding row's probabilities zero
        lse_s[i] = valid ? p.lse[p.stat(b, h, q0 + i)] * kLog2e : INFINITY;
        delta_s[i] = valid ? p.delta[p.stat(b, h, q0 + i)] : 0.f;
      }
      __syncthreads();
      const BlockKeys seen = keys_of_rows(layout, q0, q1);
      const bool masked = !(c0 + kMmaKeys <= layout.context && seen.min_context >= c0 + kMmaKeys - 1);

      // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys against the tile's 64 query rows.
      float st[kMmaRows / 8][4] = {}, dpt[kMmaRows / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t k_frag[4], v_frag[4];
        mma::load_a(k_frag, k_s, kStride, warp * 16, kk * 16, g, t);
        mma::load_a(v_frag, v_s, kStride, warp * 16, kk * 16, g, t);
#pragma unroll
        for (int nt = 0; nt < kMmaRows / 8; ++nt) {
          uint32_t qb[2], db[2];
          mma::load_b_rows_n(qb, q_s, kStride, nt * 8, kk * 16, g, t);
          mma::load_b_rows_n(db, do_s, kStride, nt * 8, kk * 16, g, t);
          mma::mma_16816<T>(st[nt], k_frag, qb);
          mma::mma_16816<T>(dpt[nt], v_frag, db);
        }
      }
      // P^T = exp(S^T * scale - lse), dS^T = P^T (dP^T - Delta).
#pragma unroll
      for (int nt = 0; nt < kMmaRows / 8; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = nt * 8 + 2 * t + (i & 1);
          const int64_t key = c0 + key_rows[i / 2], r = q0 + col;
          const bool visible = !masked || (key < c1 && r < q1 && layout.visible(r, key));
          const float prob = visible ? exp2f(st[nt][i] * scale_log2 - lse_s[col]) : 0.f;
          st[nt][i] = prob;
          dpt[nt][i] = prob * (dpt[nt][i] - delta_s[col]);
        }
      }
      // dV += P^T dO, dK += dS^T Q (queries are the reduction dimension).
#pragma unroll
      for (int kk = 0; kk < kMmaRows / 16; ++kk) {
        uint32_t p_frag[4], ds_frag[4];
        mma::c_pair_to_a<T>(p_frag, st[2 * kk], st[2 * kk + 1]);
        mma::c_pair_to_a<T>(ds_frag, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          uint32_t ob[2], qb[2];
          mma::load_b_rows_k(ob, do_s, kStride, kk * 16, dt * 8, g, t);
          mma::load_b_rows_k(qb, q_s, kStride, kk * 16, dt * 8, g, t);
          mma::mma_16816<T>(dv[dt], p_frag, ob);
          mma::mma_16816<T>(dk[dt], ds_frag, qb);
        }
      }
      // dQ += dS K: dS^T goes through shared memory, then warp w takes query rows 16w..16w+15.
#pragma unroll
      for (int nt = 0; nt < kMmaRows / 8; ++nt) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          *reinterpret_cast<uint32_t*>(ds_s + key_rows[rr] * kDsStride + nt * 8 + 2 * t) =
              mma::pack<T>(dpt[nt][2 * rr], dpt[nt][2 * rr + 1]);
        }
      }
      __syncthreads();
      float dq[D / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
        uint32_t ds_frag[4];
        mma::load_a_transposed(ds_frag, ds_s, kDsStride, warp * 16, kk * 16, g, t);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          uint32_t kb[2];
          mma::load_b_rows_k(kb, k_s, kStride, kk * 16, dt * 8, g, t);
          mma::mma_16816<T>(dq[dt], ds_frag, kb);
        }
      }
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t r = q0 + warp * 16 + g + 8 * rr;
        if (r >= q1) continue;
        float* dst = p.dq_acc + p.q_row(b, r, h);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          atomicAdd(dst + dt * 8 + 2 * t, dq[dt][2 * rr] * p.scale);
          atomicAdd(dst + dt * 8 + 2 * t + 1, dq[dt][2 * rr + 1] * p.scale);
        }
      }
    }
  }
  uint16_t* dk_out = static_cast<uint16_t*>(p.dk);
  uint16_t* dv_out = static_cast<uint16_t*>(p.dv);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t key = c0 + key_rows[rr];
    if (key >= c1) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int64_t at = p.kv_row(b, key, hk) + dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dk_out + at) = mma::pack<T>(dk[dt][2 * rr] * p.scale, dk[dt][2 * rr + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + at) = mma::pack<T>(dv[dt][2 * rr], dv[dt][2 * rr + 1]);
    }
  }
}

}  // namespace kforcing::cuda
