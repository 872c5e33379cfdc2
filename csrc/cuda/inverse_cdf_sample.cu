// inverse_cdf_sample, CUDA kernels.
//
// Rule: kforcing/sampling.h. Support = finite logits whose order key is >= a threshold key (every finite logit
// on the common path). e_v = expf(max(x_v - m, -FLT_MAX) * inv_t) in fp32 against a block-local max m, with
// inv_t = 1 / T clamped to FLT_MAX, so no temperature makes a weight NaN (-inf logits, and the -inf padding of a
// row's last chunk, weigh 0 without being exponentiated). Every sum is fp64, and every reduction and scan has a
// fixed order, so results are deterministic. No read leaves the row: a row whose search finds no chunk is invalid.
//
// Common path (no top-k / top-p), two launches, one read of the logits plus one chunk per row:
//   chunk_mass_kernel  grid = N * chunks. A block reads one kChunk-sized chunk of a row into registers with
//                      16-byte loads, and writes the chunk max m_c (NaN when the chunk holds NaN or +inf) and
//                      its mass s_c = sum exp((x - m_c) / T). Splitting V over blocks fills the GPU when N is
//                      small.
//   select_kernel      grid = N. Rescales the chunk masses to the row max M, scans them to find the chunk
//                      where the running mass reaches u * Z, and rescans only that chunk: a block-wide
//                      exclusive scan of per-thread masses, then a walk of each thread's own elements.
// top-k / top-p path, one block per row (filtered_sample_kernel):
//   1. the row max; 2. the k-th largest key by 8-bit radix select (4 histogram passes, integer counts);
//   3. the top-p threshold by bisection over keys of the deterministic mass S(t) = sum_{key >= t} e;
//   4. a tiled block scan of the row in vocabulary order until the running mass reaches u * S(threshold).
// order = "descending" always takes the filtered kernel (with or without filters), and replaces step 4:
//   4'. the tie group where the descending mass reaches the target u * S: the largest key g with S(g) >= u * S, by
//       bisection over keys between the smallest support key and the max's key (at most 32 passes of S(.)); then
//       a scan of the tokens with key == g in vocabulary order, starting from the mass S(g + 1) of larger logits.
//   Exact: the token is the first in (logit descending, id ascending) order whose running mass reaches u * S.
//   Cost per row: O(V) per pass, about 34 passes over the row (the min, the bisection, S(g + 1) and the scan).
// Invalid rows write kInvalidSample (-1): no host sync, so the op can be captured in a CUDA graph.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <cstdint>

#include "kforcing/cuda_utils.cuh"
#include "kforcing/dispatch.h"
#include "kforcing/sampling.h"

namespace kforcing::cuda {
namespace {

constexpr int kThreads = 256;                // common path: threads per block
constexpr int kItems = 16;                   // common path: logits per thread (in registers)
constexpr int kChunk = kThreads * kItems;    // common path: logits per block
constexpr int kFilterThreads = 1024;         // top-k / top-p path: one block per row
constexpr int kFilterItems = 4;              // top-k / top-p path: logits per thread per scan tile
constexpr int kRadixBins = 256;              // 8-bit digits: 4 passes over a 32-bit key

using ChunkReduceF = cub::BlockReduce<float, kThreads>;
using ChunkReduceD = cub::BlockReduce<double, kThreads>;

__device__ __forceinline__ float clamp_inv_t(double temperature) {
  return static_cast<float>(fmin(1.0 / temperature, static_cast<double>(FLT_MAX)));
}

__device__ __forceinline__ bool bad_logit(float x) { return isnan(x) || x == INFINITY; }

template <typename scalar_t>
struct RowReader {
  const scalar_t* row;
  int64_t stride;
  __device__ __forceinline__ float operator()(int64_t i) const { return static_cast<float>(row[i * stride]); }
};

__device__ __forceinline__ bool in_support(float x, uint32_t tau) { return x > -INFINITY && order_key(x) >= tau; }

// The mass weight of one logit: zero outside the support.
__device__ __forceinline__ float support_exp(float x, uint32_t tau, float m, float inv_t) {
  return in_support(x, tau) ? expf(fmaxf(x - m, -FLT_MAX) * inv_t) : 0.f;
}

// Reads this thread's kItems logits of a chunk; -inf past the end of the row.
template <typename scalar_t, bool kVectorized>
__device__ __forceinline__ void load_chunk(const RowReader<scalar_t>& reader, int64_t begin, int64_t vocab,
                                           float (&x)[kItems]) {
  if constexpr (kVectorized) {
    constexpr int kVec = 16 / sizeof(scalar_t);
#pragma unroll
    for (int j = 0; j < kItems / kVec; ++j) {
      const int64_t first = begin + (static_cast<int64_t>(j) * kThreads + threadIdx.x) * kVec;
      if (first + kVec <= vocab) {
        const auto pack = *reinterpret_cast<const Pack<scalar_t, kVec>*>(reader.row + first);
#pragma unroll
        for (int k = 0; k < kVec; ++k) x[j * kVec + k] = static_cast<float>(pack.v[k]);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) x[j * kVec + k] = first + k < vocab ? reader(first + k) : -INFINITY;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = begin + static_cast<int64_t>(j) * kThreads + threadIdx.x;
      x[j] = i < vocab ? reader(i) : -INFINITY;
    }
  }
}

template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    chunk_mass_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t col_stride, int64_t vocab,
                      int64_t num_chunks, const double* __restrict__ temperatures, double temperature,
                      float* __restrict__ chunk_max, double* __restrict__ chunk_mass) {
  __shared__ union {
    typename ChunkReduceF::TempStorage max;
    typename ChunkReduceD::TempStorage sum;
  } storage;
  __shared__ float block_max;
  const int64_t row = blockIdx.x / num_chunks, chunk = blockIdx.x % num_chunks;
  const RowReader<scalar_t> reader{logits + row * row_stride, col_stride};
  const float inv_t = clamp_inv_t(temperatures ? temperatures[row] : temperature);

  float x[kItems];
  load_chunk<scalar_t, kVectorized>(reader, chunk * kChunk, vocab, x);
  float m = -INFINITY;
  bool bad = false;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    bad |= bad_logit(x[j]);
    m = fmaxf(m, x[j]);
  }
  m = ChunkReduceF(storage.max).Reduce(m, MaxOp());
  if (threadIdx.x == 0) block_max = m;
  bad = __syncthreads_or(bad);  // also publishes block_max
  m = block_max;
  double mass = 0.0;
  if (m > -INFINITY) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) mass += support_exp(x[j], 0u, m, inv_t);
  }
  mass = ChunkReduceD(storage.sum).Sum(mass);
  if (threadIdx.x == 0) {
    chunk_max[blockIdx.x] = bad ? NAN : m;
    chunk_mass[blockIdx.x] = m > -INFINITY ? mass : 0.0;
  }
}

// Block-wide search of [begin, end): thread t owns the ITEMS consecutive logits at begin + t * ITEMS. Finds the
// first support index whose running support mass (starting at `carry`) reaches `target` (so a target of 0 finds
// the first support index). Advances `carry` by the tile's mass and `last_support` to the tile's last support
// index. Returns the index, or -1.
// Support tokens with key <= key_hi only take part (key_hi = UINT32_MAX: all of them; the descending order
// searches one tie group).
template <int THREADS, int ITEMS, typename Reader>
struct TileSearch {
  using Scan = cub::BlockScan<double, THREADS>;
  using ReduceI = cub::BlockReduce<int64_t, THREADS>;
  union TempStorage {
    typename Scan::TempStorage scan;
    typename ReduceI::TempStorage reduce;
  };

  __device__ static int64_t run(TempStorage& storage, int64_t* broadcast, const Reader& reader, int64_t begin,
                                int64_t end, uint32_t tau, uint32_t key_hi, float m, float inv_t, double target,
                                double& carry, int64_t& last_support) {
    float e[ITEMS];
    bool kept[ITEMS];
    double local = 0.0;
    const int64_t mine = begin + static_cast<int64_t>(threadIdx.x) * ITEMS;
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const float x = mine + j < end ? reader(mine + j) : -INFINITY;
      kept[j] = in_support(x, tau) && order_key(x) <= key_hi;
      e[j] = kept[j] ? support_exp(x, tau, m, inv_t) : 0.f;
      local += e[j];
    }
    double before, tile_mass;
    Scan(storage.scan).ExclusiveSum(local, before, tile_mass);
    double running = carry + before;
    int64_t found = INT64_MAX, last = -1;
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      if (kept[j]) {
        running += e[j];
        last = mine + j;
        if (found == INT64_MAX && running >= target) found = mine + j;
      }
    }
    __syncthreads();
    found = ReduceI(storage.reduce).Reduce(found, MinOp());
    if (threadIdx.x == 0) broadcast[0] = found;
    __syncthreads();
    last = ReduceI(storage.reduce).Reduce(last, MaxOp());
    if (threadIdx.x == 0) broadcast[1] = last;
    __syncthreads();
    carry += tile_mass;
    last_support = max(last_support, broadcast[1]);
    return broadcast[0] == INT64_MAX ? -1 : broadcast[0];
  }
};

__device__ __forceinline__ bool row_inputs_valid(double u, double temperature) {
  return u >= 0.0 && u <= 1.0 && temperature > 0.0 && isfinite(temperature);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    select_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t col_stride, int64_t vocab,
                  int64_t num_chunks, const float* __restrict__ chunk_max, const double* __restrict__ chunk_mass,
                  const double* __restrict__ u, const double* __restrict__ temperatures, double temperature,
                  int64_t* __restrict__ out) {
  using Search = TileSearch<kThreads, kItems, RowReader<scalar_t>>;
  using ScanD = cub::BlockScan<double, kThreads>;
  using ReduceI = cub::BlockReduce<int64_t, kThreads>;
  __shared__ union {
    typename ChunkReduceF::TempStorage max;
    typename ScanD::TempStorage scan;
    typename ReduceI::TempStorage reduce;
    typename Search::TempStorage search;
  } storage;
  __shared__ float row_max_shared;
  __shared__ double mass_before_shared;  // running mass before the chosen chunk
  __shared__ int64_t broadcast[2];

  const int64_t row = blockIdx.x;
  const float* maxes = chunk_max + row * num_chunks;
  const double* masses = chunk_mass + row * num_chunks;
  const double t = temperatures ? temperatures[row] : temperature;
  const double u_row = u[row];
  const float inv_t = clamp_inv_t(t);

  // Row max over chunk maxes; a NaN chunk max (NaN or +inf logits) makes the row invalid.
  float m = -INFINITY;
  bool bad = false;
  for (int64_t c = threadIdx.x; c < num_chunks; c += kThreads) {
    bad |= isnan(maxes[c]);
    m = fmaxf(m, maxes[c]);
  }
  m = ChunkReduceF(storage.max).Reduce(m, MaxOp());
  if (threadIdx.x == 0) row_max_shared = m;
  bad = __syncthreads_or(bad);
  m = row_max_shared;
  if (bad || !(m > -INFINITY) || !row_inputs_valid(u_row, t)) {
    if (threadIdx.x == 0) out[row] = kInvalidSample;
    return;
  }
  const double inv_t_d = static_cast<double>(inv_t);  // the clamped 1 / T (1 / T may be inf)
  auto weight = [&](int64_t c) { return masses[c] * exp((static_cast<double>(maxes[c]) - m) * inv_t_d); };

  // Z as a scan total, so the crossing search below (the same scan) is consistent with it.
  double total = 0.0;
  for (int64_t base = 0; base < num_chunks; base += kThreads) {
    const int64_t c = base + threadIdx.x;
    double incl, tile_total;
    ScanD(storage.scan).InclusiveSum(c < num_chunks ? weight(c) : 0.0, incl, tile_total);
    __syncthreads();
    total += tile_total;
  }
  const double target = u_row == 1.0 ? INFINITY : u_row * total;  // u = 1: the last support token

  // The first chunk whose inclusive running mass reaches the target (else the last chunk with mass). u = 0 takes
  // the first chunk with mass, i.e. with a support token, even when its rescaled weight underflows to 0.
  const bool first_support = u_row == 0.0;
  int64_t chosen = -1, last_chunk = -1;
  double carry = 0.0;
  for (int64_t base = 0; base < num_chunks && chosen < 0; base += kThreads) {
    const int64_t c = base + threadIdx.x;
    const bool has_mass = c < num_chunks && masses[c] > 0.0;
    const double w = has_mass ? weight(c) : 0.0;
    double incl, tile_total;
    ScanD(storage.scan).InclusiveSum(w, incl, tile_total);
    __syncthreads();
    int64_t hit = (has_mass && (first_support || (w > 0.0 && carry + incl >= target))) ? c : INT64_MAX;
    hit = ReduceI(storage.reduce).Reduce(hit, MinOp());
    if (threadIdx.x == 0) broadcast[0] = hit;
    __syncthreads();
    int64_t last = has_mass ? c : -1;
    last = ReduceI(storage.reduce).Reduce(last, MaxOp());
    if (threadIdx.x == 0) broadcast[1] = last;
    if (broadcast[0] != INT64_MAX && c == broadcast[0]) mass_before_shared = carry + incl - w;
    __syncthreads();
    if (broadcast[0] != INT64_MAX) chosen = broadcast[0];
    last_chunk = max(last_chunk, broadcast[1]);
    carry += tile_total;
    __syncthreads();
  }
  double chunk_target = INFINITY;  // past the end: the chunk's last support token
  if (chosen >= 0) {
    chunk_target = first_support
                       ? 0.0
                       : (target - mass_before_shared) / exp((static_cast<double>(maxes[chosen]) - m) * inv_t_d);
  } else {
    chosen = last_chunk;
  }
  if (chosen < 0) {  // no chunk with mass (unreachable for a valid row): invalid, never an index before the row
    if (threadIdx.x == 0) out[row] = kInvalidSample;
    return;
  }

  // Rescan the chosen chunk in the fp32 exps chunk_mass_kernel summed (same m, same inv_t).
  const RowReader<scalar_t> reader{logits + row * row_stride, col_stride};
  const int64_t begin = chosen * kChunk, end = min(begin + kChunk, vocab);
  double running = 0.0;
  int64_t last_support = -1;
  const int64_t found = Search::run(storage.search, broadcast, reader, begin, end, 0u, UINT32_MAX, maxes[chosen],
                                    inv_t, chunk_target, running, last_support);
  if (threadIdx.x == 0) out[row] = found >= 0 ? found : last_support;  // -1 (invalid) if the chunk had none
}

template <typename scalar_t>
__global__ void __launch_bounds__(kFilterThreads)
    filtered_sample_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t col_stride,
                           int64_t vocab, const double* __restrict__ u, const double* __restrict__ temperatures,
                           double temperature, int64_t top_k, double top_p, bool descending,
                           int64_t* __restrict__ out) {
  using Search = TileSearch<kFilterThreads, kFilterItems, RowReader<scalar_t>>;
  using ReduceF = cub::BlockReduce<float, kFilterThreads>;
  using ReduceD = cub::BlockReduce<double, kFilterThreads>;
  using ReduceK = cub::BlockReduce<uint32_t, kFilterThreads>;
  __shared__ union {
    typename ReduceF::TempStorage max;
    typename ReduceD::TempStorage sum;
    typename ReduceK::TempStorage key;
    typename Search::TempStorage search;
    int histogram[kRadixBins];
  } storage;
  __shared__ float row_max_shared;
  __shared__ double mass_shared;
  __shared__ uint32_t digit_shared;
  __shared__ uint32_t key_shared;
  __shared__ int64_t remaining_shared;
  __shared__ int64_t broadcast[2];

  const int64_t row = blockIdx.x;
  const RowReader<scalar_t> reader{logits + row * row_stride, col_stride};
  const double t = temperatures ? temperatures[row] : temperature;
  const double u_row = u[row];
  const float inv_t = clamp_inv_t(t);

  // 1. Row max and validity.
  float m = -INFINITY;
  bool bad = false;
  for (int64_t i = threadIdx.x; i < vocab; i += kFilterThreads) {
    const float x = reader(i);
    bad |= bad_logit(x);
    m = fmaxf(m, x);
  }
  m = ReduceF(storage.max).Reduce(m, MaxOp());
  if (threadIdx.x == 0) row_max_shared = m;
  bad = __syncthreads_or(bad);
  m = row_max_shared;
  if (bad || !(m > -INFINITY) || !row_inputs_valid(u_row, t)) {
    if (threadIdx.x == 0) out[row] = kInvalidSample;
    return;
  }

  // 2. The k-th largest key, 8 bits at a time from the top; ties at the k-th value stay in the support.
  uint32_t tau = 0;
  if (top_k > 0 && top_k < vocab) {
    uint32_t mask = 0;
    int64_t remaining = top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = threadIdx.x; b < kRadixBins; b += kFilterThreads) storage.histogram[b] = 0;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < vocab; i += kFilterThreads) {
        const uint32_t key = order_key(reader(i));
        if ((key & mask) == tau) atomicAdd(&storage.histogram[(key >> shift) & 0xFFu], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t above = 0;
        int digit = kRadixBins - 1;
        for (; digit > 0 && above + storage.histogram[digit] < remaining; --digit) above += storage.histogram[digit];
        digit_shared = digit;
        remaining_shared = remaining - above;
      }
      __syncthreads();
      tau |= digit_shared << shift;
      mask |= 0xFFu << shift;
      remaining = remaining_shared;
      __syncthreads();
    }
  }

  // Support mass S(threshold) = sum over keys >= threshold, with a fixed-order reduction.
  auto mass_from = [&](uint32_t threshold) {
    double local = 0.0;
    for (int64_t i = threadIdx.x; i < vocab; i += kFilterThreads) local += support_exp(reader(i), threshold, m, inv_t);
    local = ReduceD(storage.sum).Sum(local);
    if (threadIdx.x == 0) mass_shared = local;
    __syncthreads();
    const double result = mass_shared;
    __syncthreads();
    return result;
  };

  // 3. top-p: the largest key t with S(t) >= top_p * S(tau); then exactly the tokens whose strictly larger
  //    logits hold < top_p of the mass have key >= t.
  double support_mass = mass_from(tau);
  if (top_p < 1.0) {
    const double limit = top_p * support_mass;
    uint64_t lo = tau, hi = order_key(m);
    while (lo < hi) {
      const uint64_t mid = lo + (hi - lo + 1) / 2;
      if (mass_from(static_cast<uint32_t>(mid)) >= limit) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    tau = static_cast<uint32_t>(lo);
    support_mass = mass_from(tau);
  }

  const double target = u_row == 1.0 ? INFINITY : u_row * support_mass;  // u = 1: the last support token
  // 4'. descending: the tie group g where the descending mass reaches the target (u = 1: the smallest support
  //     key, whose search below then ends on the group's last token), and the mass S(g + 1) before it.
  uint32_t key_lo = tau, key_hi = UINT32_MAX;
  double carry = 0.0;
  if (descending) {
    uint32_t lowest = UINT32_MAX;
    for (int64_t i = threadIdx.x; i < vocab; i += kFilterThreads) {
      const float x = reader(i);
      if (in_support(x, tau)) lowest = min(lowest, order_key(x));
    }
    lowest = ReduceK(storage.key).Reduce(lowest, MinOp());
    if (threadIdx.x == 0) key_shared = lowest;
    __syncthreads();
    uint64_t lo = key_shared, hi = order_key(m);  // S(lo) = S >= target (u < 1), so lo always qualifies
    __syncthreads();
    while (lo < hi) {
      const uint64_t mid = lo + (hi - lo + 1) / 2;
      if (mass_from(static_cast<uint32_t>(mid)) >= target) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    key_lo = key_hi = static_cast<uint32_t>(lo);
    carry = lo == order_key(m) ? 0.0 : mass_from(static_cast<uint32_t>(lo + 1));
  }

  // 4. Scan the support (descending: the group) in vocabulary order, one tile at a time, until the running mass
  //    reaches u * S.
  int64_t last_support = -1, found = -1;
  for (int64_t begin = 0; begin < vocab && found < 0; begin += kFilterThreads * kFilterItems) {
    const int64_t end = min(begin + kFilterThreads * kFilterItems, vocab);
    found = Search::run(storage.search, broadcast, reader, begin, end, key_lo, key_hi, m, inv_t, target, carry,
                        last_support);
  }
  if (threadIdx.x == 0) out[row] = found >= 0 ? found : last_support;  // -1 (invalid) if no support
}

at::Tensor inverse_cdf_sample_cuda(const at::Tensor& logits, const at::Tensor& u,
                                   const std::optional<at::Tensor>& temperatures, double temperature,
                                   int64_t top_k, double top_p, c10::string_view order) {
  check_inverse_cdf_sample_args(logits, u, temperatures, temperature, top_k, top_p,
                                {at::kFloat, at::kBFloat16, at::kHalf});
  const bool descending = parse_cdf_order(order) == CdfOrder::kDescending;
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  const at::Tensor u64 = u.to(at::kDouble).contiguous();
  const at::Tensor t64 = temperatures.has_value() ? temperatures->to(at::kDouble).contiguous() : at::Tensor();
  const double* t_ptr = t64.defined() ? t64.const_data_ptr<double>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t row_stride = logits.stride(0), col_stride = logits.stride(1);

  KF_DISPATCH_FLOAT_HALF_BF16(logits.scalar_type(), "inverse_cdf_sample_cuda", [&] {
    const scalar_t* data = logits.const_data_ptr<scalar_t>();
    if (descending || sampling_filters_support(top_k, vocab, top_p)) {
      filtered_sample_kernel<scalar_t><<<rows, kFilterThreads, 0, stream>>>(
          data, row_stride, col_stride, vocab, u64.const_data_ptr<double>(), t_ptr, temperature, top_k, top_p,
          descending, out.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t num_chunks = ceil_div(vocab, kChunk);
    const at::Tensor chunk_max = at::empty({rows, num_chunks}, logits.options().dtype(at::kFloat));
    const at::Tensor chunk_mass = at::empty({rows, num_chunks}, logits.options().dtype(at::kDouble));
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorized = col_stride == 1 && row_stride % kVec == 0 &&
                            reinterpret_cast<uintptr_t>(data) % 16 == 0;
    auto chunk_kernel = vectorized ? chunk_mass_kernel<scalar_t, true> : chunk_mass_kernel<scalar_t, false>;
    chunk_kernel<<<rows * num_chunks, kThreads, 0, stream>>>(
        data, row_stride, col_stride, vocab, num_chunks, t_ptr, temperature, chunk_max.mutable_data_ptr<float>(),
        chunk_mass.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    select_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
        data, row_stride, col_stride, vocab, num_chunks, chunk_max.const_data_ptr<float>(),
        chunk_mass.const_data_ptr<double>(), u64.const_data_ptr<double>(), t_ptr, temperature,
        out.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CUDA, m) { m.impl("inverse_cdf_sample", &inverse_cdf_sample_cuda); }

}  // namespace kforcing::cuda
