#pragma once
// Vectorised building blocks of the CPU attention kernels (at::vec, compiled for the build's CPU ISA).
//
// Buffers are padded so that every loop runs whole vectors: head_dim to padded_dim(D), key tiles to kKeyTile
// columns. Padding is zero, so it never changes a result.

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kforcing::cpu {

// Keys per tile: the scores of one query row against a tile are kKeyTile / Vec::size() vector registers.
constexpr int64_t kKeyTile = 64;

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
int64_t padded_dim(int64_t d) {
  const int64_t lanes = Vec<T>::size();
  return (d + lanes - 1) / lanes * lanes;
}

// Compute type: fp64 inputs stay fp64 (gradcheck); fp32 / bf16 / fp16 compute in fp32.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// dst[0..d) = src[0..d) * scale as acc_t, dst[d..padded) = 0.
template <typename acc_t, typename scalar_t>
void load_row(const scalar_t* src, int64_t d, int64_t padded, acc_t scale, acc_t* dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<acc_t>(src[i]) * scale;
  std::fill(dst + d, dst + padded, acc_t(0));
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t d, acc_t scale, scalar_t* dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(src[i] * scale);
}

// scores[j] = sum_d q[d] * keys_t[d * kKeyTile + j] for all kKeyTile columns (keys transposed: d-major).
template <typename acc_t>
void row_scores(const acc_t* q, const acc_t* keys_t, int64_t d, acc_t* scores) {
  using V = Vec<acc_t>;
  constexpr int64_t kVecs = kKeyTile / V::size();
  V acc[kVecs];
  for (int64_t i = 0; i < kVecs; ++i) acc[i] = V(acc_t(0));
  for (int64_t k = 0; k < d; ++k) {
    const V qk(q[k]);
    const acc_t* row = keys_t + k * kKeyTile;
    for (int64_t i = 0; i < kVecs; ++i) acc[i] = at::vec::fmadd(qk, V::loadu(row + i * V::size()), acc[i]);
  }
  for (int64_t i = 0; i < kVecs; ++i) acc[i].store(scores + i * V::size());
}

// y[0..n) += a * x[0..n), n a multiple of the vector width.
template <typename acc_t>
void axpy(acc_t a, const acc_t* x, acc_t* y, int64_t n) {
  using V = Vec<acc_t>;
  const V va(a);
  for (int64_t i = 0; i < n; i += V::size()) at::vec::fmadd(va, V::loadu(x + i), V::loadu(y + i)).store(y + i);
}

// out[0..padded) += sum_{j < n} coef[j * coef_stride] * rows[j * padded + 0..padded): a weighted sum of rows,
// accumulated in registers, kRowChunk vectors of `out` at a time (4 vectors = 64 fp32 lanes on AVX-512). The sum
// starts from zero and is added to `out` once, so a long running total picks up one rounding per call, not n.
template <typename acc_t>
void weighted_row_sum(const acc_t* coef, int64_t coef_stride, const acc_t* rows, int64_t n, int64_t padded,
                      acc_t* out) {
  using V = Vec<acc_t>;
  constexpr int64_t kRowChunk = 4;
  auto run = [&](auto chunk_vecs, int64_t c) {
    constexpr int64_t kVecs = decltype(chunk_vecs)::value;
    V acc[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) acc[i] = V(acc_t(0));
    for (int64_t j = 0; j < n; ++j) {
      const V w(coef[j * coef_stride]);
      const acc_t* row = rows + j * padded + c;
      for (int64_t i = 0; i < kVecs; ++i) acc[i] = at::vec::fmadd(w, V::loadu(row + i * V::size()), acc[i]);
    }
    for (int64_t i = 0; i < kVecs; ++i) (acc[i] + V::loadu(out + c + i * V::size())).store(out + c + i * V::size());
  };
  int64_t c = 0;
  for (; c + kRowChunk * V::size() <= padded; c += kRowChunk * V::size()) {
    run(std::integral_constant<int64_t, kRowChunk>{}, c);
  }
  for (; c < padded; c += V::size()) run(std::integral_constant<int64_t, 1>{}, c);
}

template <typename acc_t>
acc_t max_of(const acc_t* x, int64_t n) {
  using V = Vec<acc_t>;
  int64_t j = 0;
  acc_t result = neg_inf<acc_t>();
  if (n >= V::size()) {
    V m = V::loadu(x);
    for (j = V::size(); j + V::size() <= n; j += V::size()) m = at::vec::maximum(m, V::loadu(x + j));
    alignas(64) acc_t lanes[V::size()];
    m.store(lanes);
    result = *std::max_element(lanes, lanes + V::size());
  }
  for (; j < n; ++j) result = std::max(result, x[j]);
  return result;
}

// x[j] = exp(x[j] - shift) for j < n; returns their sum.
template <typename acc_t>
acc_t exp_shifted_sum(acc_t* x, int64_t n, acc_t shift) {
  using V = Vec<acc_t>;
  const V vshift(shift);
  V vsum(acc_t(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V e = (V::loadu(x + j) - vshift).exp();
    e.store(x + j);
    vsum = vsum + e;
  }
  alignas(64) acc_t lanes[V::size()];
  vsum.store(lanes);
  acc_t sum = 0;
  for (int64_t i = 0; i < V::size(); ++i) sum += lanes[i];
  for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

template <typename acc_t>
void scale_inplace(acc_t a, acc_t* y, int64_t n) {
  using V = Vec<acc_t>;
  const V va(a);
  for (int64_t i = 0; i < n; i += V::size()) (va * V::loadu(y + i)).store(y + i);
}

template <typename acc_t>
acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  using V = Vec<acc_t>;
  V acc(acc_t(0));
  for (int64_t i = 0; i < n; i += V::size()) acc = at::vec::fmadd(V::loadu(x + i), V::loadu(y + i), acc);
  alignas(64) acc_t lanes[V::size()];
  acc.store(lanes);
  acc_t total = 0;
  for (int64_t i = 0; i < V::size(); ++i) total += lanes[i];
  return total;
}

// Online softmax state of one query row: running max m, running sum l, and the unnormalised output acc.
template <typename acc_t>
struct OnlineRow {
  acc_t m = neg_inf<acc_t>();
  acc_t l = 0;

  // Folds scores s[0..n) (already scaled) of keys with values vals[j * padded + ...] into acc; s is overwritten.
  void update(acc_t* s, int64_t n, const acc_t* vals, int64_t padded, acc_t* acc) {
    if (n <= 0) return;
    const acc_t m_new = std::max(m, max_of(s, n));
    const acc_t alpha = std::exp(m - m_new);  // 0 on the first tile (m = -inf)
    l = l * alpha + exp_shifted_sum(s, n, m_new);
    if (alpha != acc_t(1)) scale_inplace(alpha, acc, padded);
    weighted_row_sum(s, 1, vals, n, padded, acc);
    m = m_new;
  }

  acc_t lse() const { return m + std::log(l); }
};

}  // namespace kforcing::cpu
