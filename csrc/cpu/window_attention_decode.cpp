// window_attention_decode, CPU kernel: T new rows per sequence against a preallocated KV cache.
//
// Semantics: kforcing_ops/attention.py. Algorithm: one task per (batch, kv head). Its rows are the T new rows of
// the G query heads sharing that kv head, and they share every key tile: a tile of kKeyTile keys is loaded
// (transposed) once and scored against all T * G rows with an online softmax. Tiles sit at fixed absolute positions
// [0, 64), [64, 128), ... of the sequence [cache | new rows], a tile straddling the two taking keys from both; new
// row j (position len_b + j) folds in each tile's keys up to its own position. So a row's result depends only on
// its position and the keys up to it, never on how many rows share the call or which of its keys were appended
// in earlier calls: one T-row pass gives bitwise the outputs of T one-row passes (row invariance, which makes a
// verify pass's logits equal AR's bit for bit). Last, the first n_commit new K/V rows are copied into the cache at
// [len_b, len_b + n_commit) of this (batch, kv head): a slice no other task reads or writes. The lengths are copied
// and checked before anything is written, so a cache overflow raises instead of writing out of bounds, even when
// the lengths live in a cache.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "kforcing/attention.h"
#include "kforcing/cpu_vec.h"

namespace kforcing::cpu {
namespace {

constexpr const char* kOp = "window_attention_decode";
// How far ahead cache rows are prefetched: two tiles, enough loads in flight to cover memory latency.
constexpr int64_t kPrefetchRows = 2 * kKeyTile;

template <typename scalar_t>
struct DecodeArgs {
  const scalar_t *q, *k_new, *v_new;
  scalar_t *k_cache, *v_cache, *out;
  at::IntArrayRef sq, sk, sv, skc, svc, so;  // strides
  const int64_t* lengths;  // read once, before any write
  int64_t new_rows, heads, kv_heads, dim, n_commit;
  double scale;

  template <typename T>
  static T* row(T* base, at::IntArrayRef st, int64_t b, int64_t s, int64_t h) {
    return base + b * st[0] + s * st[1] + h * st[2];
  }
};

// Asks for a cache row ahead of use: consecutive rows of one (batch, kv head) are 2 * H_kv * D bytes apart,
// which the hardware prefetcher does not follow, and waiting on each row's load would bound the kernel by latency.
template <typename scalar_t>
void prefetch_row(const scalar_t* row, int64_t dim) {
  constexpr int64_t kLine = 64;
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < dim * static_cast<int64_t>(sizeof(scalar_t)); offset += kLine) {
    __builtin_prefetch(bytes + offset);
  }
}

template <typename scalar_t>
void decode_task(const DecodeArgs<scalar_t>& a, int64_t b, int64_t hk) {
  using acc_t = acc_type_t<scalar_t>;
  using Args = DecodeArgs<scalar_t>;
  const int64_t d = a.dim, padded = padded_dim<acc_t>(d), group = a.heads / a.kv_heads, t_new = a.new_rows;
  const int64_t n_rows = t_new * group, length = a.lengths[b];
  std::vector<acc_t> q(n_rows * padded), acc(n_rows * padded, acc_t(0)), scores(kKeyTile);
  std::vector<acc_t> keys_t(d * kKeyTile), vals(kKeyTile * padded), scratch(padded);
  std::vector<OnlineRow<acc_t>> state(n_rows);
  // Row r = (new row j, query head h): r = j * group + (h - hk * group).
  for (int64_t r = 0; r < n_rows; ++r) {
    const scalar_t* src = Args::row(a.q, a.sq, b, r / group, hk * group + r % group);
    load_row(src, d, padded, static_cast<acc_t>(a.scale), q.data() + r * padded);
  }
  // Key tiles at absolute positions [t0, t0 + kKeyTile) of the sequence [cache | new rows], whichever tensor each key
  // comes from. New row j sits at position length + j and sees the keys up to it. While loading key pos it asks for
  // the cache row kPrefetchRows ahead.
  const int64_t total = length + t_new;
  for (int64_t t0 = 0; t0 < total; t0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, total - t0);
    std::fill(keys_t.begin(), keys_t.end(), acc_t(0));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = t0 + j;
      if (pos + kPrefetchRows < length) {
        prefetch_row(Args::row(a.k_cache, a.skc, b, pos + kPrefetchRows, hk), d);
        prefetch_row(Args::row(a.v_cache, a.svc, b, pos + kPrefetchRows, hk), d);
      }
      const bool cached = pos < length;
      const scalar_t* key = cached ? Args::row(a.k_cache, a.skc, b, pos, hk)
                                   : Args::row(a.k_new, a.sk, b, pos - length, hk);
      const scalar_t* val = cached ? Args::row(a.v_cache, a.svc, b, pos, hk)
                                   : Args::row(a.v_new, a.sv, b, pos - length, hk);
      load_row(key, d, padded, acc_t(1), scratch.data());
      for (int64_t i = 0; i < d; ++i) keys_t[i * kKeyTile + j] = scratch[i];
      load_row(val, d, padded, acc_t(1), vals.data() + j * padded);
    }
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t visible = std::min(n, length + r / group - t0 + 1);
      if (visible <= 0) continue;
      row_scores(q.data() + r * padded, keys_t.data(), d, scores.data());
      state[r].update(scores.data(), visible, vals.data(), padded, acc.data() + r * padded);
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    scalar_t* dst = Args::row(a.out, a.so, b, r / group, hk * group + r % group);
    store_row(acc.data() + r * padded, d, acc_t(1) / state[r].l, dst);
  }
  for (int64_t j = 0; j < a.n_commit; ++j) {
    std::copy_n(Args::row(a.k_new, a.sk, b, j, hk), d, Args::row(a.k_cache, a.skc, b, length + j, hk));
    std::copy_n(Args::row(a.v_new, a.sv, b, j, hk), d, Args::row(a.v_cache, a.svc, b, length + j, hk));
  }
}

at::Tensor window_attention_decode_cpu(const at::Tensor& q_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                       int64_t n_commit, double scale) {
  check_decode_args(q_in, k_new_in, v_new_in, k_cache, v_cache, cache_seqlens, n_commit,
                    {at::kFloat, at::kBFloat16, at::kDouble});
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k_new = k_new_in.stride(3) == 1 ? k_new_in : k_new_in.contiguous();
  const at::Tensor v_new = v_new_in.stride(3) == 1 ? v_new_in : v_new_in.contiguous();
  const int64_t batch = q.size(0), kv_heads = k_new.size(2), max_len = k_cache.size(1);
  // The lengths are read once, here: the tensor may share memory with a cache that the tasks below write.
  std::vector<int64_t> len(batch);
  const auto lengths = cache_seqlens.accessor<int32_t, 1>();
  for (int64_t b = 0; b < batch; ++b) {
    len[b] = lengths[b];
    KF_CHECK_VALUE(len[b] >= 0 && len[b] + n_commit <= max_len, kOp, "cache overflow: sequence ", b, " has ",
                   len[b], " cached rows, and ", n_commit, " more do not fit in L_max = ", max_len);
  }
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "window_attention_decode_cpu", [&] {
    const DecodeArgs<scalar_t> args{q.const_data_ptr<scalar_t>(), k_new.const_data_ptr<scalar_t>(),
                                    v_new.const_data_ptr<scalar_t>(), k_cache.mutable_data_ptr<scalar_t>(),
                                    v_cache.mutable_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                    q.strides(), k_new.strides(), v_new.strides(), k_cache.strides(),
                                    v_cache.strides(), out.strides(), len.data(), q.size(1), q.size(2), kv_heads,
                                    q.size(3), n_commit, scale};
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) decode_task(args, task / kv_heads, task % kv_heads);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CPU, m) { m.impl("window_attention_decode", &window_attention_decode_cpu); }

}  // namespace kforcing::cpu
