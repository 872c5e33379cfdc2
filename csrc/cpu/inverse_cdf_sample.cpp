// inverse_cdf_sample, CPU kernel.
//
// Rule: kforcing/sampling.h. Algorithm, one row per task (rows in parallel with at::parallel_for):
//   1. Support threshold t: -inf on the common path (no top-k / top-p). With top-k, the k-th largest logit
//      (nth_element on a scratch copy of the row); with top-p, the logit of the tie group at which the
//      descending mass first reaches top_p * Z (a sort of the surviving logits).
//   2. One pass over kChunk-sized chunks: a chunk is read once into L1 in the compute type, and gives its max m_c
//      and its mass s_c = sum over the support (x >= t, x > -inf) of exp((x - m_c) * inv_t): vectorised exp,
//      fp64 accumulation. The row mass is Z = sum_c s_c * exp((m_c - M) * inv_t) in fp64, with M the row max.
//   3. Walk the chunk masses to the chunk where the running mass reaches u * Z, and rescan only that chunk,
//      element by element with an fp64 running sum. u = 0 takes the first support token (the first chunk with
//      support, whatever its rescaled mass), u = 1 or a target above every running mass the last one.
// order = "descending" replaces 2-3 (sample_row_descending): one pass collects the support as (logit, id) pairs
// and weighs them exp((x - M) * inv_t); a sort by (logit descending, id ascending), O(S log S) for a support of
// S tokens (S = V without top-k / top-p, about k with it); then the walk to u * Z in that order.
// Compute type: fp32 for fp32 / bf16 / fp16 logits, fp64 for fp64 logits. inv_t = 1 / T clamped to the compute
// type's largest finite value, so no temperature makes an exponent NaN: (x - m) is clamped to the lowest finite
// value and -inf logits are outside the support, never exponentiated.
// Precision: exp is in the compute type (1 ulp), every sum is fp64, so for fp32-family logits the result equals
// an fp64 reference unless u lies within about 1e-7 (relative) of a CDF boundary; tests/test_sampling.py
// measures this.
// Memory: each row is read once plus one chunk, never outside the row; no (N, V) temporaries; O(V) scratch per
// thread only when top-k / top-p or the descending order is used.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "kforcing/dispatch.h"
#include "kforcing/sampling.h"

namespace kforcing {
namespace {

constexpr const char* kOp = "inverse_cdf_sample";
// Logits per chunk: 8 KB of fp32, so a chunk stays in L1 between its max pass and its exp pass.
constexpr int64_t kChunk = 2048;
// Minimum logits per parallel task, so that small problems do not pay for waking threads.
constexpr int64_t kGrainElements = 1 << 15;

template <typename calc_t>
using Vec = at::vec::Vectorized<calc_t>;

template <typename calc_t>
constexpr calc_t neg_inf() {
  return -std::numeric_limits<calc_t>::infinity();
}

// fp64 logits are sampled in fp64; every other dtype in fp32.
template <typename scalar_t>
using calc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename calc_t>
struct ChunkMass {
  calc_t max;   // max over the whole chunk (NaN if any NaN): equals the support max when the support meets it
  double mass;  // sum over the support of exp((x - max) * inv_t)
};

// Per-thread buffers, reused across the rows of a task.
template <typename calc_t>
struct Scratch {
  std::vector<calc_t> chunk = std::vector<calc_t>(kChunk);
  std::vector<calc_t> exps = std::vector<calc_t>(kChunk);
  std::vector<ChunkMass<calc_t>> chunks;
  std::vector<calc_t> row;  // top-k / top-p only
  std::vector<std::pair<calc_t, int64_t>> support;  // order = "descending" only
};

// Elements [begin, begin + n) of a row in the compute type: the row itself when it already is contiguous in it.
template <typename scalar_t, typename calc_t>
const calc_t* load_row_part(const scalar_t* row, int64_t stride, int64_t begin, int64_t n, calc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, calc_t>) {
    if (stride == 1) return row + begin;
  }
  if (stride == 1) {
    at::vec::convert(row + begin, buffer, n);
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<calc_t>(row[(begin + i) * stride]);
  }
  return buffer;
}

template <typename calc_t>
calc_t nan_propagating_max(const calc_t* x, int64_t n) {
  using V = Vec<calc_t>;
  V vmax(neg_inf<calc_t>());
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) vmax = at::vec::maximum(vmax, V::loadu(x + i));
  alignas(64) calc_t lanes[V::size()];
  vmax.store(lanes);
  calc_t m = neg_inf<calc_t>();
  auto take = [&m](calc_t value) { m = (value > m || value != value) ? value : m; };
  for (int j = 0; j < V::size(); ++j) take(lanes[j]);
  for (; i < n; ++i) take(x[i]);
  return m;
}

template <typename calc_t>
bool in_support(calc_t x, calc_t threshold) {
  return x >= threshold && x > neg_inf<calc_t>();
}

// exp(max(x - m, lowest) * inv_t) over the support, else 0, written to `out` (the values chunk_mass sums). m is
// finite, so no exponent is NaN for any inv_t in [0, max].
template <typename calc_t>
void support_exps(const calc_t* x, int64_t n, calc_t m, calc_t threshold, calc_t inv_t, calc_t* out) {
  using V = Vec<calc_t>;
  constexpr calc_t kLowest = std::numeric_limits<calc_t>::lowest();
  const V vm(m), vinv(inv_t), vthreshold(threshold), vlowest(kLowest), vneg_inf(neg_inf<calc_t>()), zero(0);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    const V v = V::loadu(x + i);
    const V e = (at::vec::maximum(v - vm, vlowest) * vinv).exp();
    V::blendv(zero, e, (v >= vthreshold) & (v > vneg_inf)).store(out + i);
  }
  for (; i < n; ++i) out[i] = in_support(x[i], threshold) ? std::exp(std::max(x[i] - m, kLowest) * inv_t) : calc_t(0);
}

template <typename calc_t>
ChunkMass<calc_t> chunk_mass(const calc_t* x, int64_t n, calc_t threshold, calc_t inv_t, calc_t* exps) {
  using V = Vec<calc_t>;
  const calc_t m = nan_propagating_max(x, n);
  if (!(m > neg_inf<calc_t>())) return {m, 0.0};  // all -inf, or NaN (the caller reports it)
  support_exps(x, n, m, threshold, inv_t, exps);
  // Lane-wise fp64 accumulators: fp32 exps are summed without fp32 rounding.
  double acc[V::size()] = {};
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    for (int j = 0; j < V::size(); ++j) acc[j] += exps[i + j];
  }
  double mass = 0.0;
  for (int j = 0; j < V::size(); ++j) mass += acc[j];
  for (; i < n; ++i) mass += exps[i];
  return {m, mass};
}

template <typename calc_t>
void check_row_max(calc_t m, int64_t row) {
  KF_CHECK_VALUE(!std::isnan(m) && m != std::numeric_limits<calc_t>::infinity(), kOp, "row ", row,
                 " of `logits` contains NaN or +inf");
}

// The support threshold for top-k and/or top-p (see the rule in kforcing/sampling.h).
template <typename scalar_t, typename calc_t>
calc_t support_threshold(const scalar_t* row, int64_t stride, int64_t vocab, double inv_t, int64_t top_k,
                         double top_p, Scratch<calc_t>& scratch, int64_t row_index) {
  auto& values = scratch.row;
  values.resize(vocab);
  const calc_t* x = load_row_part(row, stride, 0, vocab, values.data());
  if (x != values.data()) std::copy(x, x + vocab, values.begin());
  const calc_t row_max = nan_propagating_max(values.data(), vocab);
  check_row_max(row_max, row_index);
  KF_CHECK_VALUE(row_max > neg_inf<calc_t>(), kOp, "row ", row_index, " of `logits` has no finite logit");

  calc_t threshold = neg_inf<calc_t>();
  int64_t kept = vocab;
  if (top_k > 0 && top_k < vocab) {
    std::nth_element(values.begin(), values.begin() + (top_k - 1), values.end(), std::greater<calc_t>());
    threshold = values[top_k - 1];
    // Every logit equal to the k-th one survives too: ties are never broken by position.
    kept = std::partition(values.begin(), values.end(), [threshold](calc_t v) { return v >= threshold; }) -
           values.begin();
  }
  if (top_p < 1.0) {
    std::sort(values.begin(), values.begin() + kept, std::greater<calc_t>());
    // -inf logits weigh nothing (and inv_t may be 0, so they must not reach the product).
    auto weight = [&](calc_t v) {
      return v > neg_inf<calc_t>() ? std::exp((static_cast<double>(v) - row_max) * inv_t) : 0.0;
    };
    double total = 0.0;
    for (int64_t i = 0; i < kept; ++i) total += weight(values[i]);
    const double limit = top_p * total;
    double above = 0.0;  // mass of logits strictly larger than the current group
    for (int64_t i = 0; i < kept && above < limit && values[i] > neg_inf<calc_t>();) {
      const calc_t value = values[i];
      threshold = value;
      for (; i < kept && values[i] == value; ++i) above += weight(values[i]);
    }
  }
  return threshold;
}

// order = "descending": the support sorted by (logit descending, id ascending), walked to u * Z.
template <typename scalar_t, typename calc_t>
int64_t sample_row_descending(const scalar_t* row, int64_t stride, int64_t vocab, double u, double inv_t,
                              calc_t threshold, Scratch<calc_t>& scratch, int64_t row_index) {
  auto& support = scratch.support;
  support.clear();
  calc_t row_max = neg_inf<calc_t>();
  for (int64_t i = 0; i < vocab; ++i) {
    const calc_t x = static_cast<calc_t>(row[i * stride]);
    check_row_max(x, row_index);
    row_max = std::max(row_max, x);
    if (in_support(x, threshold)) support.emplace_back(x, i);
  }
  KF_CHECK_VALUE(!support.empty(), kOp, "row ", row_index, " of `logits` has no finite logit");
  std::sort(support.begin(), support.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  if (u == 0.0) return support.front().second;
  // The weights as the vocab order forms them (an fp32 exp for fp32-family logits), summed in fp64.
  constexpr calc_t kLowest = std::numeric_limits<calc_t>::lowest();
  const calc_t inv_t_c = static_cast<calc_t>(inv_t);
  auto weight = [&](calc_t x) { return static_cast<double>(std::exp(std::max(x - row_max, kLowest) * inv_t_c)); };
  double total = 0.0;
  for (const auto& entry : support) total += weight(entry.first);
  // u = 1 is the end of the CDF: the last support token, even when rounding reaches u * Z earlier.
  const double target = u == 1.0 ? std::numeric_limits<double>::infinity() : u * total;
  double running = 0.0;
  for (const auto& entry : support) {
    running += weight(entry.first);
    if (running >= target) return entry.second;
  }
  return support.back().second;
}

template <typename scalar_t, typename calc_t>
int64_t sample_row(const scalar_t* row, int64_t stride, int64_t vocab, double u, double temperature,
                   int64_t top_k, double top_p, CdfOrder order, Scratch<calc_t>& scratch, int64_t row_index) {
  KF_CHECK_VALUE(u >= 0.0 && u <= 1.0, kOp, "`u` must lie in [0, 1]; row ", row_index, " has ", u);
  KF_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), kOp,
                 "`temperature` must be positive and finite; row ", row_index, " has ", temperature);
  // 1 / T clamped to the compute type (it overflows for T below 1 / max); the clamp is part of the rule.
  const double inv_t = std::min(1.0 / temperature, static_cast<double>(std::numeric_limits<calc_t>::max()));
  const calc_t inv_t_c = static_cast<calc_t>(inv_t);
  const calc_t threshold = sampling_filters_support(top_k, vocab, top_p)
                               ? support_threshold(row, stride, vocab, inv_t, top_k, top_p, scratch, row_index)
                               : neg_inf<calc_t>();
  if (order == CdfOrder::kDescending) {
    return sample_row_descending(row, stride, vocab, u, inv_t, threshold, scratch, row_index);
  }

  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  auto& chunks = scratch.chunks;
  chunks.resize(num_chunks);
  calc_t row_max = neg_inf<calc_t>();
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t begin = c * kChunk, n = std::min(kChunk, vocab - begin);
    const calc_t* x = load_row_part(row, stride, begin, n, scratch.chunk.data());
    chunks[c] = chunk_mass(x, n, threshold, inv_t_c, scratch.exps.data());
    check_row_max(chunks[c].max, row_index);
    row_max = std::max(row_max, chunks[c].max);
  }
  KF_CHECK_VALUE(row_max > neg_inf<calc_t>(), kOp, "row ", row_index, " of `logits` has no finite logit");

  // Chunk masses on the row's common scale exp(-M * inv_t); `scale` is reused for the rescan. A chunk has mass
  // exactly when it holds a support token (its max has weight 1), but its rescaled weight may underflow to 0.
  auto scale = [&](int64_t c) { return std::exp((static_cast<double>(chunks[c].max) - row_max) * inv_t); };
  double total = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (chunks[c].mass > 0.0) total += chunks[c].mass * scale(c);
  }
  // u = 1 is the end of the CDF: the last support token, even when rounding reaches u * Z earlier.
  const double target = u == 1.0 ? std::numeric_limits<double>::infinity() : u * total;
  int64_t chosen = -1;
  double chunk_target = std::numeric_limits<double>::infinity();  // past the end: the last support token
  if (u == 0.0) {
    for (int64_t c = 0; c < num_chunks && chosen < 0; ++c) {
      if (chunks[c].mass > 0.0) chosen = c;
    }
    chunk_target = 0.0;  // the chunk's first support token
  } else {
    double prefix = 0.0;
    int64_t last_with_mass = -1;
    for (int64_t c = 0; c < num_chunks && chosen < 0; ++c) {
      if (!(chunks[c].mass > 0.0)) continue;
      last_with_mass = c;
      const double weight = chunks[c].mass * scale(c);
      if (weight > 0.0 && prefix + weight >= target) {
        chosen = c;
        chunk_target = (target - prefix) / scale(c);
      }
      prefix += weight;
    }
    if (chosen < 0) chosen = last_with_mass;
  }
  // Unreachable for a row that passed the checks above; an error, never an index outside the row.
  KF_CHECK_VALUE(chosen >= 0, kOp, "row ", row_index, " of `logits` has no token of nonzero probability");

  const int64_t begin = chosen * kChunk, n = std::min(kChunk, vocab - begin);
  const calc_t* x = load_row_part(row, stride, begin, n, scratch.chunk.data());
  calc_t* exps = scratch.exps.data();
  support_exps(x, n, chunks[chosen].max, threshold, inv_t_c, exps);
  double running = 0.0;
  int64_t last_support = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (!in_support(x[i], threshold)) continue;
    running += exps[i];
    last_support = i;
    if (running >= chunk_target) break;
  }
  return begin + last_support;
}

at::Tensor inverse_cdf_sample_cpu(const at::Tensor& logits, const at::Tensor& u,
                                  const std::optional<at::Tensor>& temperatures, double temperature,
                                  int64_t top_k, double top_p, c10::string_view order) {
  check_inverse_cdf_sample_args(logits, u, temperatures, temperature, top_k, top_p,
                                {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  const CdfOrder cdf_order = parse_cdf_order(order);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  const at::Tensor u64 = u.to(at::kDouble).contiguous();
  const at::Tensor t64 = temperatures.has_value() ? temperatures->to(at::kDouble).contiguous() : at::Tensor();
  const double* u_ptr = u64.const_data_ptr<double>();
  const double* t_ptr = t64.defined() ? t64.const_data_ptr<double>() : nullptr;
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / vocab);

  KF_DISPATCH_FLOAT_HALF_BF16_DOUBLE(logits.scalar_type(), "inverse_cdf_sample_cpu", [&] {
    using calc_t = calc_type_t<scalar_t>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0), col_stride = logits.stride(1);
    at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
      Scratch<calc_t> scratch;
      for (int64_t r = first; r < last; ++r) {
        const double t = t_ptr ? t_ptr[r] : temperature;
        out_ptr[r] = sample_row(base + r * row_stride, col_stride, vocab, u_ptr[r], t, top_k, top_p, cdf_order,
                                scratch, r);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CPU, m) { m.impl("inverse_cdf_sample", &inverse_cdf_sample_cpu); }

}  // namespace kforcing
