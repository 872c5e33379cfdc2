#pragma once
// Window (block-causal) attention: the staircase geometry and argument checks shared by the CPU and CUDA kernels.
//
// Training layout, S = N + num_windows * W rows: N context rows, then num_windows windows of W hint rows, window t
// anchored at context row t. Row r may attend to key j when
//   j is a context key (j < N) and j <= last_context(r)   (context row s: s itself; hint row of window t: t), or
//   j and r are hints of one window and offset(j) <= offset(r).
// So every hint row of window t sees exactly the context keys that context row t sees: the context part of the
// mask is causal attention "at the anchor", and the in-window part is a W x W causal block per window.

#include <ATen/core/Tensor.h>

#include <initializer_list>

#include "kforcing/checks.h"

#if defined(__CUDACC__)
#define KF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KF_HOST_DEVICE inline
#endif

namespace kforcing {

struct WindowLayout {
  int64_t context;      // N
  int64_t num_windows;  // windows of hint rows
  int64_t window_size;  // W

  KF_HOST_DEVICE int64_t rows() const { return context + num_windows * window_size; }
  KF_HOST_DEVICE bool is_hint(int64_t r) const { return r >= context; }
  KF_HOST_DEVICE int64_t window(int64_t r) const { return (r - context) / window_size; }
  KF_HOST_DEVICE int64_t offset(int64_t r) const { return (r - context) % window_size; }
  // The last context key row r sees.
  KF_HOST_DEVICE int64_t last_context(int64_t r) const { return r < context ? r : window(r); }
  // The first hint row of r's window (r must be a hint row).
  KF_HOST_DEVICE int64_t window_start(int64_t r) const { return context + window(r) * window_size; }
  KF_HOST_DEVICE bool visible(int64_t r, int64_t j) const {
    if (j < context) return j <= last_context(r);
    return r >= context && window(j) == window(r) && j <= r;
  }
};

// The row statistics saved for backward (log-sum-exp) are fp64 for fp64 inputs and fp32 otherwise.
inline at::ScalarType lse_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

inline WindowLayout check_window_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                int64_t num_windows, int64_t window_size,
                                                std::initializer_list<at::ScalarType> dtypes, const char* op) {
  check_dim(q, 4, op, "q", "(batch, seq, heads, head_dim)");
  check_dim(k, 4, op, "k", "(batch, seq, kv_heads, head_dim)");
  check_dim(v, 4, op, "v", "(batch, seq, kv_heads, head_dim)");
  check_dtype(q, dtypes, op, "q");
  KF_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                "`q`, `k` and `v` must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                v.scalar_type());
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  KF_CHECK_VALUE(k.sizes() == v.sizes(), op, "`k` and `v` must have one shape, got ", k.sizes(), " and ",
                 v.sizes());
  check_size(k, 0, q.size(0), op, "k", "batch");
  check_size(k, 1, q.size(1), op, "k", "seq, as q");
  check_size(k, 3, q.size(3), op, "k", "head_dim, as q");
  KF_CHECK_VALUE(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, op, "the kv heads of `k` (", k.size(2),
                 ") must divide the heads of `q` (", q.size(2), ")");
  KF_CHECK_VALUE(q.size(3) >= 1, op, "`q` must have head_dim >= 1, got shape ", q.sizes());
  KF_CHECK_VALUE(window_size >= 1, op, "`window_size` must be >= 1, got ", window_size);
  KF_CHECK_VALUE(num_windows >= 0, op, "`num_windows` must be >= 0, got ", num_windows);
  // S = N + num_windows * window_size with N >= 1 and num_windows <= N, tested without forming the product (it
  // may wrap around int64): window_size <= (S - 1) / num_windows  <=>  num_windows * window_size <= S - 1.
  const int64_t seq = q.size(1);
  const bool fits = seq >= 1 && (num_windows == 0 || window_size <= (seq - 1) / num_windows);
  const int64_t context = fits ? seq - num_windows * window_size : 0;
  KF_CHECK_VALUE(fits && num_windows <= context, op, "`q` has ", seq,
                 " rows, which must be N context rows + num_windows * window_size (", num_windows, " * ",
                 window_size, ") hint rows with 1 <= num_windows <= N");
  return WindowLayout{context, num_windows, window_size};
}

inline void check_window_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                                 const at::Tensor& out, const at::Tensor& lse, const char* op) {
  KF_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
                 "`grad_out` and `out` must have the shape of `q` ", q.sizes(), ", got ", grad_out.sizes(), " and ",
                 out.sizes());
  KF_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                "`grad_out` and `out` must have q's dtype ", q.scalar_type());
  KF_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
                 op, "`lse` must be (batch, heads, seq) = (", q.size(0), ", ", q.size(2), ", ", q.size(1),
                 "), got ", lse.sizes());
  KF_CHECK_TYPE(lse.scalar_type() == lse_dtype(q.scalar_type()), op, "`lse` must be ", lse_dtype(q.scalar_type()),
                " for ", q.scalar_type(), " inputs, got ", lse.scalar_type());
}

inline void check_decode_args(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                              const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                              int64_t n_commit, std::initializer_list<at::ScalarType> dtypes) {
  constexpr const char* op = "window_attention_decode";
  check_dim(q, 4, op, "q", "(batch, new_rows, heads, head_dim)");
  check_dim(k_new, 4, op, "k_new", "(batch, new_rows, kv_heads, head_dim)");
  check_dim(v_new, 4, op, "v_new", "(batch, new_rows, kv_heads, head_dim)");
  check_dim(k_cache, 4, op, "k_cache", "(batch, max_len, kv_heads, head_dim)");
  check_dim(v_cache, 4, op, "v_cache", "(batch, max_len, kv_heads, head_dim)");
  check_dtype(q, dtypes, op, "q");
  for (const auto* t : {&k_new, &v_new, &k_cache, &v_cache}) {
    KF_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, "`q`, `k_new`, `v_new`, `k_cache` and `v_cache` must ",
                  "have one dtype; q is ", q.scalar_type(), ", another is ", t->scalar_type());
    check_same_device(*t, q, op, "k_new/v_new/k_cache/v_cache", "q");
  }
  KF_CHECK_VALUE(k_new.sizes() == v_new.sizes(), op, "`k_new` and `v_new` must have one shape, got ",
                 k_new.sizes(), " and ", v_new.sizes());
  KF_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), op, "`k_cache` and `v_cache` must have one shape, got ",
                 k_cache.sizes(), " and ", v_cache.sizes());
  check_size(k_new, 0, q.size(0), op, "k_new", "batch");
  check_size(k_new, 1, q.size(1), op, "k_new", "T new rows, as q");
  check_size(k_new, 3, q.size(3), op, "k_new", "head_dim, as q");
  check_size(k_cache, 0, q.size(0), op, "k_cache", "batch");
  check_size(k_cache, 2, k_new.size(2), op, "k_cache", "kv_heads, as k_new");
  check_size(k_cache, 3, q.size(3), op, "k_cache", "head_dim, as q");
  KF_CHECK_VALUE(q.size(2) >= 1, op, "`q` must have at least one head, got shape ", q.sizes());
  KF_CHECK_VALUE(q.size(3) >= 1, op, "`q` must have head_dim >= 1, got shape ", q.sizes());
  KF_CHECK_VALUE(k_new.size(2) >= 1 && q.size(2) % k_new.size(2) == 0, op, "the kv heads of `k_new` (",
                 k_new.size(2), ") must divide the heads of `q` (", q.size(2), ")");
  check_dim(cache_seqlens, 1, op, "cache_seqlens", "(batch,)");
  check_size(cache_seqlens, 0, q.size(0), op, "cache_seqlens", "one length per sequence");
  check_dtype(cache_seqlens, {at::kInt}, op, "cache_seqlens");
  check_same_device(cache_seqlens, q, op, "cache_seqlens", "q");
  KF_CHECK_VALUE(n_commit >= 0 && n_commit <= q.size(1), op, "`n_commit` must be in [0, T=", q.size(1), "], got ",
                 n_commit);
  KF_CHECK_VALUE(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op,
                 "`k_cache` and `v_cache` must be contiguous in head_dim (they are written in place)");
  // Written in place: every cache element must be its own memory, and nothing read may live in a cache.
  KF_CHECK_VALUE(is_non_overlapping(k_cache) && is_non_overlapping(v_cache), op,
                 "`k_cache` and `v_cache` must not be expanded or otherwise overlap themselves (sequences and heads ",
                 "would overwrite each other), got strides ", k_cache.strides(), " and ", v_cache.strides());
  KF_CHECK_VALUE(!may_share_memory(k_cache, v_cache), op, "`k_cache` and `v_cache` must not share memory");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&k_new, "k_new"}, {&v_new, "v_new"},
                                {&q, "q"}}) {
    KF_CHECK_VALUE(!may_share_memory(*t, k_cache) && !may_share_memory(*t, v_cache), op, "`", name,
                   "` must not share memory with `k_cache` or `v_cache`: the caches are written in place ",
                   "while it is read");
  }
}

}  // namespace kforcing
