// decode_linear, CPU kernel: y = x @ W^T + b for the 1 to 16 rows of a decode step, at the memory roofline.
//
// Semantics: kforcing_ops/linear.py. A decode step reads every weight once and does a few FMAs with each, so it is
// bound by how fast the weights stream from memory. torch's GEMM packs and blocks for large M and streams a few
// rows' weights at a third of the machine's bandwidth; this kernel streams them once, straight from W's rows.
//
// Algorithm. W (N, K) is split into blocks of kCols consecutive output rows (contiguous memory), and
// at::parallel_for hands each thread a contiguous range of blocks, so each thread reads one linear stretch of W
// (the hardware prefetcher follows it). For a block, the M rows of x go by in groups of up to kRows: each
// (row, output) pair owns one vector accumulator in a register, and each K-chunk of the block's weight rows is
// loaded once into registers and FMA'd against every row of the group. The first group brings the block's weights
// from memory; the later groups (M > kRows) find them in L1. x is first copied into an fp32 buffer whose rows are
// padded with zeros to whole vectors, which makes any stride and bf16 x look the same to the inner loop.
//
// Row invariance, by construction: output (m, n) is always the same chain of FMAs (K-chunk 0, 1, ... into one
// accumulator, the K tail's weights loaded under a mask), then one fixed-order horizontal sum, then + bias. Nothing
// in that chain depends on M, on the row's place in the call, on the group sizes or on the thread split, so a row's
// result is bitwise the same whatever rows share the call (for a given build ISA).
//
// bf16 weights are widened to fp32 in registers (bf16 -> fp32 is a 16-bit shift, exact), so x keeps its fp32
// precision and every product and sum is fp32: half the bytes to read, the same arithmetic as an fp32 weight
// holding the bf16 values.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "kforcing/linear.h"


namespace kforcing::cpu {
namespace {

// One fp32 vector of the build's ISA: load (fp32 or bf16 widened), masked tail load, FMA, horizontal sum.
#if defined(__AVX512F__)
struct Simd {
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int kRows = 6, kCols = 4;  // 24 accumulators + 4 weight vectors + 1 x vector of 32 registers
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  static V load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static V load_first(const c10::BFloat16* p, int64_t n) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Simd {
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int kRows = 3, kCols = 3;  // 9 accumulators + 3 weight vectors + 1 x vector of 16 registers
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load_first(const float* p, int64_t n) {
    alignas(32) float tmp[kLanes] = {};
    std::memcpy(tmp, p, n * sizeof(float));
    return _mm256_load_ps(tmp);
  }
  static V load_first(const c10::BFloat16* p, int64_t n) {
    alignas(32) c10::BFloat16 tmp[kLanes] = {};
    std::memcpy(tmp, p, n * sizeof(c10::BFloat16));
    return load(tmp);
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
  }
};
#else
// No vector ISA: 8-lane arrays the compiler may vectorise; the same chain per (row, output) as above.
struct Simd {
  struct V {
    float v[8];
  };
  static constexpr int64_t kLanes = 8;
  static constexpr int kRows = 2, kCols = 2;
  static V zero() { return V{}; }
  template <typename T>
  static V load(const T* p) {
    V r;
    for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(p[i]);
    return r;
  }
  template <typename T>
  static V load_first(const T* p, int64_t n) {
    V r{};
    for (int64_t i = 0; i < n; ++i) r.v[i] = static_cast<float>(p[i]);
    return r;
  }
  static V fma(V a, V b, V c) {
    for (int i = 0; i < 8; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
    return c;
  }
  static float sum(V v) {
    float s = 0;
    for (int i = 0; i < 8; ++i) s += v.v[i];
    return s;
  }
};
#endif

using V = Simd::V;
constexpr int64_t kLanes = Simd::kLanes;

// How far ahead of the stream weights are prefetched: kPrefetchBytes of W rows, a few KB, enough loads in flight
// to cover memory latency (measured at one row: 1 to 8 fp32 blocks stream alike; no prefetch is 15% slower).
constexpr int64_t kPrefetchBytes = 2 * Simd::kCols * 4;  // x K: two blocks of fp32 rows

struct Problem {
  const float* x;  // (M, K) fp32, row stride ldx; readable (zero-padded) up to a whole vector past K
  int64_t ldx, k;
  const float* bias;  // (N,) fp32 or null
  float* y;           // (M, N) contiguous
  int64_t m, n;
};

// y[r, c] for the R rows starting at x and the C outputs whose weight rows start at w: the chain described in the
// header.
//
// Prefetch: while group g of G computes, it asks for rows g, g + G, ... of the rows
// prefetch_rows ahead (same columns). A thread's blocks are adjacent rows of W, so that runs a few KB ahead of its
// stream, and the G groups share the requests, so memory stays busy while later groups compute on weights in L1.
template <int R, int C, typename W>
void dot_tile(const Problem& p, int64_t row, const W* w, int64_t ldw, int64_t prefetch_rows, int group, int groups,
              int64_t col) {
  const float* x = p.x + row * p.ldx;
  const int64_t ldx = p.ldx, k = p.k;
  V acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Simd::zero();
  const int64_t body = k / kLanes * kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int c = group; c < C; c += groups) __builtin_prefetch(w + (c + prefetch_rows) * ldw + i);
    V wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Simd::load(w + c * ldw + i);
    for (int r = 0; r < R; ++r) {
      const V xv = Simd::load(x + r * ldx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = Simd::fma(xv, wv[c], acc[r][c]);
    }
  }
  if (body < k) {  // the K tail: x is zero-padded past k; W's rows may end there, so its loads are masked
    V wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Simd::load_first(w + c * ldw + body, k - body);
    for (int r = 0; r < R; ++r) {
      const V xv = Simd::load(x + r * ldx + body);
      for (int c = 0; c < C; ++c) acc[r][c] = Simd::fma(xv, wv[c], acc[r][c]);
    }
  }
  float* y = p.y + row * p.n + col;
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const float total = Simd::sum(acc[r][c]);
      y[r * p.n + c] = p.bias ? total + p.bias[col + c] : total;
    }
  }
}

// The tile kernel for r rows and c outputs (r <= kRows, c <= kCols): a table of instantiations.
template <typename W>
using TileFn = void (*)(const Problem&, int64_t, const W*, int64_t, int64_t, int, int, int64_t);

template <typename W, int R, int... Cs>
constexpr std::array<TileFn<W>, sizeof...(Cs)> row_of_tiles(std::integer_sequence<int, Cs...>) {
  return {&dot_tile<R, Cs + 1, W>...};
}

template <typename W>
constexpr auto tile_table() {
  return []<int... Rs>(std::integer_sequence<int, Rs...>) {
    return std::array<std::array<TileFn<W>, Simd::kCols>, sizeof...(Rs)>{
        row_of_tiles<W, Rs + 1>(std::make_integer_sequence<int, Simd::kCols>{})...};
  }(std::make_integer_sequence<int, Simd::kRows>{});
}

template <typename W>
void run(const Problem& p, const W* weight, int64_t ldw) {
  static constexpr auto table = tile_table<W>();
  const int64_t blocks = (p.n + Simd::kCols - 1) / Simd::kCols;
  const int groups = static_cast<int>((p.m + Simd::kRows - 1) / Simd::kRows);
  const int64_t prefetch_rows = kPrefetchBytes / static_cast<int64_t>(sizeof(W));
  // Grain: at least 16 blocks (64+ weight rows) per task, so a thread streams long stretches of W.
  at::parallel_for(0, blocks, 16, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t col = b * Simd::kCols, cols = std::min<int64_t>(Simd::kCols, p.n - col);
      // Rows in `groups` groups of near-equal size (8 rows: 4 + 4, not 6 + 2): the fewest loads per FMA.
      int64_t row = 0;
      for (int g = 0; g < groups; ++g) {
        const int rows = static_cast<int>(p.m / groups + (g < p.m % groups));
        table[rows - 1][cols - 1](p, row, weight + col * ldw, ldw, prefetch_rows, g, groups, col);
        row += rows;
      }
    }
  });
}

}  // namespace

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias) {
  const int64_t m = check_decode_linear_args(x, weight_in, bias, {at::kFloat, at::kBFloat16});
  const int64_t k = weight_in.size(1), n = weight_in.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return out.to(x.scalar_type());
  if (k == 0) {  // an empty sum: y = bias, or 0
    if (bias.has_value()) {
      out.copy_(bias->to(at::kFloat).expand_as(out));
    } else {
      out.zero_();
    }
    return out.to(x.scalar_type());
  }
  // The inner loop needs unit stride along K; any row stride is fine (a sliced weight streams as it is).
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  // fp32 rows of whole vectors are read in place; anything else (bf16, a K tail, odd strides) is copied into a
  // zero-padded fp32 buffer first (M x K is small next to W).
  const at::Tensor rows = x.reshape({m, k});
  const bool in_place = x.scalar_type() == at::kFloat && rows.stride(1) == 1 && k % kLanes == 0;
  const int64_t ldx = in_place ? rows.stride(0) : (k + kLanes - 1) / kLanes * kLanes;
  std::vector<float> padded;
  if (!in_place) {
    padded.assign(m * ldx, 0.f);
    const at::Tensor rows_f = rows.to(at::kFloat);
    const auto acc = rows_f.accessor<float, 2>();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; ++i) padded[r * ldx + i] = acc[r][i];
  }
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const Problem p{in_place ? rows.const_data_ptr<float>() : padded.data(), ldx, k,
                  bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(), m, n};
  if (weight.scalar_type() == at::kBFloat16) {
    run(p, weight.const_data_ptr<c10::BFloat16>(), weight.stride(0));
  } else {
    run(p, weight.const_data_ptr<float>(), weight.stride(0));
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

TORCH_LIBRARY_IMPL(kforcing, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

}  // namespace kforcing::cpu
