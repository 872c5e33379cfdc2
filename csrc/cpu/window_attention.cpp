// window_attention, CPU kernels: the training staircase, forward and backward.
//
// Mask and layout: kforcing/attention.h. Context row p and the hint rows of window p see the same context keys
// 0..p, so the kernels group rows by anchor p: a block of kAnchorBlock anchors holds up to kAnchorBlock * (1 + W)
// query rows that share every context key tile. Keys are visited only where the mask allows them: context tiles
// up to the block's last anchor (the partial tile clipped per row), then each window's W x W causal block, kKeyTile
// keys at a time (a window of any size: tile i0 of a window is seen by its rows i0.. only).
// Nothing of size S x S (scores or mask) is ever formed.
//
// Forward, one task per (batch, head, anchor block): online softmax (running max m, sum l, output accumulator)
// over the context tiles and then the window keys; writes out and lse = m + log(l), the row statistics the
// backward needs.
// Backward, one task per (batch, kv head), which owns dK and dV of that kv head (so no two tasks write the same
// row: deterministic, no atomics) and the dQ rows of every query head of its group. Per visible (row, key):
//   p = exp(q.k * scale - lse),  dp = dO.v,  ds = p * (dp - Delta) with Delta = dO.O,
//   dV[key] += p dO,  dK[key] += scale ds q,  dQ[row] += scale ds k.
// Compute is fp32 for fp32/bf16 inputs and fp64 for fp64 inputs (for gradcheck).

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

constexpr const char* kOp = "window_attention";
// Anchors per forward task / backward step: their rows share the K/V tiles loaded for them.
constexpr int64_t kAnchorBlock = 16;

// A (B, S, H, D) tensor's element strides (D contiguous).
struct Rows4d {
  int64_t batch, seq, head;
  template <typename T>
  T* at(T* base, int64_t b, int64_t s, int64_t h) const {
    return base + b * batch + s * seq + h * head;
  }
};

Rows4d strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The query rows of anchors [p0, p1): context row p, then the hint rows of window p.
void anchor_rows(const WindowLayout& layout, int64_t p0, int64_t p1, std::vector<int64_t>& rows) {
  rows.clear();
  for (int64_t p = p0; p < p1; ++p) {
    rows.push_back(p);
    if (p < layout.num_windows) {
      for (int64_t i = 0; i < layout.window_size; ++i) rows.push_back(layout.context + p * layout.window_size + i);
    }
  }
}

// Rows [k0, k0 + n) of one kv head, transposed: d-major with kKeyTile columns, zero past n. `rows`, when given,
// also receives them row-major (padded).
template <typename scalar_t, typename acc_t>
void load_key_tile(const scalar_t* base, const Rows4d& st, int64_t b, int64_t h, int64_t k0, int64_t n, int64_t d,
                   int64_t padded, acc_t* transposed, acc_t* rows, acc_t* scratch) {
  std::fill(transposed, transposed + d * kKeyTile, acc_t(0));
  for (int64_t j = 0; j < n; ++j) {
    acc_t* row = rows ? rows + j * padded : scratch;
    load_row(st.at(base, b, k0 + j, h), d, padded, acc_t(1), row);
    for (int64_t i = 0; i < d; ++i) transposed[i * kKeyTile + j] = row[i];
  }
}

// Rows [k0, k0 + n) of one kv head, row-major (padded).
template <typename scalar_t, typename acc_t>
void load_value_rows(const scalar_t* base, const Rows4d& st, int64_t b, int64_t h, int64_t k0, int64_t n, int64_t d,
                     int64_t padded, acc_t* rows) {
  for (int64_t j = 0; j < n; ++j) load_row(st.at(base, b, k0 + j, h), d, padded, acc_t(1), rows + j * padded);
}

template <typename scalar_t>
struct Inputs {
  const scalar_t *q, *k, *v;
  Rows4d sq, sk, sv;
  int64_t heads, kv_heads, dim;
  double scale;
};

template <typename scalar_t>
void forward_task(const Inputs<scalar_t>& in, const WindowLayout& layout, int64_t b, int64_t h, int64_t p0,
                  int64_t p1, scalar_t* out, const Rows4d& so, acc_type_t<scalar_t>* lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t d = in.dim, padded = padded_dim<acc_t>(d), hk = h / (in.heads / in.kv_heads);
  const int64_t w = layout.window_size, seq = layout.rows();
  std::vector<int64_t> rows;
  anchor_rows(layout, p0, p1, rows);
  const int64_t n_rows = rows.size();
  std::vector<acc_t> q(n_rows * padded), acc(n_rows * padded, acc_t(0)), scores(kKeyTile);
  std::vector<acc_t> keys_t(d * kKeyTile), scratch(padded), vals(kKeyTile * padded);
  std::vector<OnlineRow<acc_t>> state(n_rows);
  for (int64_t r = 0; r < n_rows; ++r) {
    load_row(in.sq.at(in.q, b, rows[r], h), d, padded, static_cast<acc_t>(in.scale), q.data() + r * padded);
  }

  // Context keys: tiles up to the last anchor, each row clipped to its own last context key.
  for (int64_t k0 = 0; k0 < p1; k0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, p1 - k0);
    load_key_tile(in.k, in.sk, b, hk, k0, n, d, padded, keys_t.data(), static_cast<acc_t*>(nullptr), scratch.data());
    load_value_rows(in.v, in.sv, b, hk, k0, n, d, padded, vals.data());
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t visible = std::min(n, layout.last_context(rows[r]) + 1 - k0);
      if (visible <= 0) continue;
      row_scores(q.data() + r * padded, keys_t.data(), d, scores.data());
      state[r].update(scores.data(), visible, vals.data(), padded, acc.data() + r * padded);
    }
  }
  // In-window keys: hint row i of window p sees hints 0..i of window p (rows r..r+w-1 of `rows` after row p),
  // kKeyTile keys at a time; rows before a tile see none of it, so tile [i0, i0 + n) is scored by rows i0..w-1.
  for (int64_t r = 0; r < n_rows; ++r) {
    if (!layout.is_hint(rows[r]) || layout.offset(rows[r]) != 0) continue;
    const int64_t first = rows[r];
    for (int64_t i0 = 0; i0 < w; i0 += kKeyTile) {
      const int64_t n = std::min(kKeyTile, w - i0);
      load_key_tile(in.k, in.sk, b, hk, first + i0, n, d, padded, keys_t.data(), static_cast<acc_t*>(nullptr),
                    scratch.data());
      load_value_rows(in.v, in.sv, b, hk, first + i0, n, d, padded, vals.data());
      for (int64_t i = i0; i < w; ++i) {
        row_scores(q.data() + (r + i) * padded, keys_t.data(), d, scores.data());
        state[r + i].update(scores.data(), std::min(n, i - i0 + 1), vals.data(), padded, acc.data() + (r + i) * padded);
      }
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    store_row(acc.data() + r * padded, d, acc_t(1) / state[r].l, so.at(out, b, rows[r], h));
    lse[(b * in.heads + h) * seq + rows[r]] = state[r].lse();
  }
}

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  return {q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          strides_of(q), strides_of(k), strides_of(v), q.size(2), k.size(2), q.size(3), scale};
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, int64_t num_windows,
                                                        int64_t window_size, double scale) {
  const WindowLayout layout = check_window_attention_args(q_in, k_in, v_in, num_windows, window_size,
                                                          {at::kFloat, at::kBFloat16, at::kDouble}, kOp);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const int64_t batch = q.size(0), heads = q.size(2);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({batch, heads, layout.rows()}, q.options().dtype(lse_dtype(q.scalar_type())));
  const int64_t blocks = (layout.context + kAnchorBlock - 1) / kAnchorBlock;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "window_attention_cpu", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(q, k, v, scale);
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const Rows4d so = strides_of(out);
    auto* lse_ptr = lse.mutable_data_ptr<acc_type_t<scalar_t>>();
    at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t block = task % blocks, bh = task / blocks;
        const int64_t p0 = block * kAnchorBlock, p1 = std::min(p0 + kAnchorBlock, layout.context);
        forward_task(in, layout, bh / heads, bh % heads, p0, p1, out_ptr, so, lse_ptr);
      }
    });
  });
  return {out, lse};
}

template <typename scalar_t>
struct GradBuffers {
  using acc_t = acc_type_t<scalar_t>;
  int64_t padded;
  std::vector<acc_t> q, dout, dq, keys_t, keys, vals_t, scratch;
  std::vector<acc_t> probs, dscores;  // (rows, kKeyTile): p and ds of one key tile, zero where masked
  std::vector<acc_t> dk, dv;          // every key row of the kv head
  std::vector<acc_t> delta, lse;
  std::vector<int64_t> rows;

  GradBuffers(int64_t d, int64_t seq, int64_t max_rows)
      : padded(padded_dim<acc_t>(d)),
        q(max_rows * padded), dout(max_rows * padded), dq(max_rows * padded),
        keys_t(d * kKeyTile), keys(kKeyTile * padded), vals_t(d * kKeyTile), scratch(padded),
        probs(max_rows * kKeyTile), dscores(max_rows * kKeyTile), dk(seq * padded, acc_t(0)),
        dv(seq * padded, acc_t(0)), delta(max_rows), lse(max_rows) {}
};

// Gradient contributions of the n keys [k0, k0 + n) loaded in `g` to rows [first, last) of g.rows, where row r sees
// the first visible(r) of them. dQ accumulates sum ds k (scaled when stored); dK and dV are summed key by key
// over the rows, each accumulator in registers.
template <typename scalar_t, typename VisibleFn>
void backward_tile(GradBuffers<scalar_t>& g, int64_t k0, int64_t n, int64_t d, int64_t first, int64_t last,
                   VisibleFn visible) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t padded = g.padded;
  for (int64_t r = first; r < last; ++r) {
    acc_t* p = &g.probs[(r - first) * kKeyTile];
    acc_t* ds = &g.dscores[(r - first) * kKeyTile];
    const int64_t seen = std::clamp<int64_t>(visible(r), 0, n);
    row_scores(&g.q[r * padded], g.keys_t.data(), d, p);  // q is pre-scaled
    row_scores(&g.dout[r * padded], g.vals_t.data(), d, ds);
    exp_shifted_sum(p, seen, g.lse[r]);
    for (int64_t j = 0; j < seen; ++j) ds[j] = p[j] * (ds[j] - g.delta[r]);
    std::fill(p + seen, p + kKeyTile, acc_t(0));
    std::fill(ds + seen, ds + kKeyTile, acc_t(0));
    weighted_row_sum(ds, 1, g.keys.data(), seen, padded, &g.dq[r * padded]);
  }
  for (int64_t j = 0; j < n; ++j) {
    weighted_row_sum(&g.probs[j], kKeyTile, &g.dout[first * padded], last - first, padded, &g.dv[(k0 + j) * padded]);
    // q is pre-scaled, so this is scale * ds * q
    weighted_row_sum(&g.dscores[j], kKeyTile, &g.q[first * padded], last - first, padded, &g.dk[(k0 + j) * padded]);
  }
}

template <typename scalar_t>
void backward_task(const Inputs<scalar_t>& in, const scalar_t* dout, const Rows4d& sdo, const scalar_t* out,
                   const Rows4d& so, const acc_type_t<scalar_t>* lse, const WindowLayout& layout, int64_t b,
                   int64_t hk,
                   scalar_t* dq, scalar_t* dk, scalar_t* dv, const Rows4d& sdq, const Rows4d& sdk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t d = in.dim, group = in.heads / in.kv_heads, seq = layout.rows(), w = layout.window_size;
  // Without windows, window_size only names the layout (and may be anything >= 1): no hint rows to hold.
  GradBuffers<scalar_t> g(d, seq, kAnchorBlock * (1 + (layout.num_windows > 0 ? w : 0)));
  const int64_t padded = g.padded;
  std::vector<acc_t> o(padded);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t p0 = 0; p0 < layout.context; p0 += kAnchorBlock) {
      const int64_t p1 = std::min(p0 + kAnchorBlock, layout.context);
      anchor_rows(layout, p0, p1, g.rows);
      const int64_t n_rows = g.rows.size();
      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t row = g.rows[r];
        load_row(in.sq.at(in.q, b, row, h), d, padded, static_cast<acc_t>(in.scale), &g.q[r * padded]);
        load_row(sdo.at(dout, b, row, h), d, padded, acc_t(1), &g.dout[r * padded]);
        load_row(so.at(out, b, row, h), d, padded, acc_t(1), o.data());
        g.delta[r] = dot(&g.dout[r * padded], o.data(), padded);
        g.lse[r] = lse[(b * in.heads + h) * seq + row];
      }
      std::fill(g.dq.begin(), g.dq.begin() + n_rows * padded, acc_t(0));
      auto load_tile = [&](int64_t k0, int64_t n) {
        load_key_tile(in.k, in.sk, b, hk, k0, n, d, padded, g.keys_t.data(), g.keys.data(), g.scratch.data());
        load_key_tile(in.v, in.sv, b, hk, k0, n, d, padded, g.vals_t.data(), static_cast<acc_t*>(nullptr),
                      g.scratch.data());
      };
      for (int64_t k0 = 0; k0 < p1; k0 += kKeyTile) {
        const int64_t n = std::min(kKeyTile, p1 - k0);
        load_tile(k0, n);
        backward_tile(g, k0, n, d, 0, n_rows, [&](int64_t r) { return layout.last_context(g.rows[r]) + 1 - k0; });
      }
      // In-window keys, kKeyTile at a time: tile [i0, i0 + n) of a window is seen by its rows i0..w-1.
      for (int64_t r = 0; r < n_rows; ++r) {
        if (!layout.is_hint(g.rows[r]) || layout.offset(g.rows[r]) != 0) continue;
        for (int64_t i0 = 0; i0 < w; i0 += kKeyTile) {
          const int64_t n = std::min(kKeyTile, w - i0), k0 = g.rows[r] + i0;
          load_tile(k0, n);
          backward_tile(g, k0, n, d, r + i0, r + w, [&](int64_t i) { return i - (r + i0) + 1; });
        }
      }
      const acc_t scale = static_cast<acc_t>(in.scale);
      for (int64_t r = 0; r < n_rows; ++r) store_row(&g.dq[r * padded], d, scale, sdq.at(dq, b, g.rows[r], h));
    }
  }
  for (int64_t j = 0; j < seq; ++j) {
    store_row(&g.dk[j * padded], d, acc_t(1), sdk.at(dk, b, j, hk));
    store_row(&g.dv[j * padded], d, acc_t(1), sdk.at(dv, b, j, hk));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t num_windows, int64_t window_size, double scale) {
  constexpr const char* op = "window_attention_backward";
  const WindowLayout layout = check_window_attention_args(q_in, k_in, v_in, num_windows, window_size,
                                                          {at::kFloat, at::kBFloat16, at::kDouble}, op);
  check_window_attention_backward_args(grad_out_in, q_in, out_in, lse_in, op);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor dout = last_dim_contiguous(grad_out_in), out = last_dim_contiguous(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const int64_t batch = q.size(0), kv_heads = k.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "window_attention_backward_cpu", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(q, k, v, scale);
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        backward_task(in, dout.const_data_ptr<scalar_t>(), strides_of(dout), out.const_data_ptr<scalar_t>(),
                      strides_of(out), lse.const_data_ptr<acc_type_t<scalar_t>>(), layout, task / kv_heads, task % kv_heads,
                      dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                      dv.mutable_data_ptr<scalar_t>(), strides_of(dq), strides_of(dk));
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace kforcing::cpu
