// inverse_cdf_sample, CPU kernel.
//
// Rule: kforcing/sampling.h. Algorithm, one row per task (rows in parallel with at::parallel_for):
//   1. Support threshold t: -inf on the common path (no top-k / top-p). With top-k, the k-th largest logit
//      (nth_element on an fp32 scratch copy of the row); with top-p, the logit of the tie group at which the
//      descending mass first reaches top_p * Z (a sort of the surviving logits).
//   2. One pass over kChunk-sized chunks: a chunk is read once into L1 as fp32, and gives its max m_c and its
//      mass s_c = sum_{x >= t} exp((x - m_c) / T): vectorised fp32 exp, fp64 accumulation. The row mass is
//      Z = sum_c s_c * exp((m_c - M) / T) in fp64, with M the row max.
//   3. Walk the chunk masses to the chunk where the running mass reaches u * Z, and rescan only that chunk,
//      element by element with an fp64 running sum.
// Precision: exp is fp32 (1 ulp), every sum is fp64, so the result equals an fp64 reference unless u lies
// within about 1e-7 (relative) of a CDF boundary; tests/test_sampling.py measures this.
// Memory: each row is read once plus one chunk; no (N, V) temporaries; O(V) fp32 scratch per thread only
// when top-k / top-p is used.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
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
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using Vec = at::vec::Vectorized<float>;

struct ChunkMass {
  float max;    // max over the whole chunk (NaN if any NaN): equals the support max when the support meets it
  double mass;  // sum over the support of exp((x - max) / T)
};

// Per-thread buffers, reused across the rows of a task.
struct Scratch {
  std::vector<float> chunk = std::vector<float>(kChunk);
  std::vector<float> exps = std::vector<float>(kChunk);
  std::vector<ChunkMass> chunks;
  std::vector<float> row;  // top-k / top-p only
};

// Elements [begin, begin + n) of a row as fp32: the row itself when it already is contiguous fp32.
template <typename scalar_t>
const float* load_as_float(const scalar_t* row, int64_t stride, int64_t begin, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 1) return row + begin;
  }
  if (stride == 1) {
    at::vec::convert(row + begin, buffer, n);
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(row[(begin + i) * stride]);
  }
  return buffer;
}

float nan_propagating_max(const float* x, int64_t n) {
  Vec vmax(kNegInf);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + i));
  alignas(64) float lanes[Vec::size()];
  vmax.store(lanes);
  float m = kNegInf;
  auto take = [&m](float value) { m = (value > m || value != value) ? value : m; };
  for (int j = 0; j < Vec::size(); ++j) take(lanes[j]);
  for (; i < n; ++i) take(x[i]);
  return m;
}

// exp((x - m) * inv_t) for x >= threshold, else 0, written to `out` (fp32, the same values chunk_mass sums).
void support_exps(const float* x, int64_t n, float m, float threshold, float inv_t, float* out) {
  const Vec vm(m), vinv(inv_t), vthreshold(threshold), zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    Vec::blendv(zero, ((v - vm) * vinv).exp(), v >= vthreshold).store(out + i);
  }
  for (; i < n; ++i) out[i] = x[i] >= threshold ? std::exp((x[i] - m) * inv_t) : 0.f;
}

ChunkMass chunk_mass(const float* x, int64_t n, float threshold, float inv_t, float* exps) {
  const float m = nan_propagating_max(x, n);
  if (!(m > kNegInf)) return {m, 0.0};  // all -inf, or NaN (the caller reports it)
  support_exps(x, n, m, threshold, inv_t, exps);
  // Lane-wise fp64 accumulators: the fp32 exps are summed without fp32 rounding.
  double acc[Vec::size()] = {};
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    for (int j = 0; j < Vec::size(); ++j) acc[j] += exps[i + j];
  }
  double mass = 0.0;
  for (int j = 0; j < Vec::size(); ++j) mass += acc[j];
  for (; i < n; ++i) mass += exps[i];
  return {m, mass};
}

void check_row_max(float m, int64_t row) {
  KF_CHECK_VALUE(!std::isnan(m) && m != std::numeric_limits<float>::infinity(), kOp, "row ", row,
                 " of `logits` contains NaN or +inf");
}

// The support threshold for top-k and/or top-p (see the rule in kforcing/sampling.h).
template <typename scalar_t>
float support_threshold(const scalar_t* row, int64_t stride, int64_t vocab, double inv_t, int64_t top_k,
                        double top_p, Scratch& scratch, int64_t row_index) {
  auto& values = scratch.row;
  values.resize(vocab);
  const float* x = load_as_float(row, stride, 0, vocab, values.data());
  if (x != values.data()) std::copy(x, x + vocab, values.begin());
  const float row_max = nan_propagating_max(values.data(), vocab);
  check_row_max(row_max, row_index);
  KF_CHECK_VALUE(row_max > kNegInf, kOp, "row ", row_index, " of `logits` has no finite logit");

  float threshold = kNegInf;
  int64_t kept = vocab;
  if (top_k > 0 && top_k < vocab) {
    std::nth_element(values.begin(), values.begin() + (top_k - 1), values.end(), std::greater<float>());
    threshold = values[top_k - 1];
    // Every logit equal to the k-th one survives too: ties are never broken by position.
    kept = std::partition(values.begin(), values.end(), [threshold](float v) { return v >= threshold; }) -
           values.begin();
  }
  if (top_p < 1.0) {
    std::sort(values.begin(), values.begin() + kept, std::greater<float>());
    auto weight = [&](float v) { return std::exp(static_cast<double>(v - row_max) * inv_t); };
    double total = 0.0;
    for (int64_t i = 0; i < kept; ++i) total += weight(values[i]);
    const double limit = top_p * total;
    double above = 0.0;  // mass of logits strictly larger than the current group
    for (int64_t i = 0; i < kept && above < limit;) {
      const float value = values[i];
      threshold = value;
      for (; i < kept && values[i] == value; ++i) above += weight(values[i]);
    }
  }
  return threshold;
}

template <typename scalar_t>
int64_t sample_row(const scalar_t* row, int64_t stride, int64_t vocab, double u, double temperature,
                   int64_t top_k, double top_p, Scratch& scratch, int64_t row_index) {
  KF_CHECK_VALUE(u >= 0.0 && u <= 1.0, kOp, "`u` must lie in [0, 1]; row ", row_index, " has ", u);
  KF_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), kOp,
                 "`temperature` must be positive and finite; row ", row_index, " has ", temperature);
  const double inv_t = 1.0 / temperature;
  const float inv_t_f = static_cast<float>(std::min<double>(inv_t, std::numeric_limits<float>::max()));
  const float threshold = sampling_filters_support(top_k, vocab, top_p)
                              ? support_threshold(row, stride, vocab, inv_t, top_k, top_p, scratch, row_index)
                              : kNegInf;

  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  auto& chunks = scratch.chunks;
  chunks.resize(num_chunks);
  float row_max = kNegInf;
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t begin = c * kChunk, n = std::min(kChunk, vocab - begin);
    const float* x = load_as_float(row, stride, begin, n, scratch.chunk.data());
    chunks[c] = chunk_mass(x, n, threshold, inv_t_f, scratch.exps.data());
    check_row_max(chunks[c].max, row_index);
    row_max = std::max(row_max, chunks[c].max);
  }
  KF_CHECK_VALUE(row_max > kNegInf, kOp, "row ", row_index, " of `logits` has no finite logit");

  // Chunk masses on the row's common scale exp(-M / T); `scale` is reused for the rescan.
  auto scale = [&](int64_t c) { return std::exp((static_cast<double>(chunks[c].max) - row_max) * inv_t); };
  double total = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (chunks[c].mass > 0.0) total += chunks[c].mass * scale(c);
  }
  const double target = u * total;
  double prefix = 0.0;
  int64_t chosen = -1;
  double chunk_target = std::numeric_limits<double>::infinity();  // past the end: the last nonzero token
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (!(chunks[c].mass > 0.0)) continue;
    const double weight = chunks[c].mass * scale(c);
    chosen = c;
    if (prefix + weight >= target) {
      chunk_target = (target - prefix) / scale(c);
      break;
    }
    prefix += weight;
  }

  const int64_t begin = chosen * kChunk, n = std::min(kChunk, vocab - begin);
  const float* x = load_as_float(row, stride, begin, n, scratch.chunk.data());
  float* exps = scratch.exps.data();
  support_exps(x, n, chunks[chosen].max, threshold, inv_t_f, exps);
  double running = 0.0;
  int64_t last_nonzero = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (exps[i] > 0.f) {
      running += exps[i];
      last_nonzero = i;
      if (running >= chunk_target) break;
    }
  }
  return begin + last_nonzero;
}

at::Tensor inverse_cdf_sample_cpu(const at::Tensor& logits, const at::Tensor& u,
                                  const std::optional<at::Tensor>& temperatures, double temperature,
                                  int64_t top_k, double top_p) {
  check_inverse_cdf_sample_args(logits, u, temperatures, temperature, top_k, top_p);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  const at::Tensor u64 = u.to(at::kDouble).contiguous();
  const at::Tensor t64 = temperatures.has_value() ? temperatures->to(at::kDouble).contiguous() : at::Tensor();
  const double* u_ptr = u64.const_data_ptr<double>();
  const double* t_ptr = t64.defined() ? t64.const_data_ptr<double>() : nullptr;
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / vocab);

  KF_DISPATCH_FLOAT_HALF_BF16(logits.scalar_type(), "inverse_cdf_sample_cpu", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0), col_stride = logits.stride(1);
    at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
      Scratch scratch;
      for (int64_t r = first; r < last; ++r) {
        const double t = t_ptr ? t_ptr[r] : temperature;
        out_ptr[r] = sample_row(base + r * row_stride, col_stride, vocab, u_ptr[r], t, top_k, top_p, scratch, r);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CPU, m) { m.impl("inverse_cdf_sample", &inverse_cdf_sample_cpu); }

}  // namespace kforcing
