// window_attention, CUDA entry points: forward and backward of the training staircase.
//
// bf16/fp16 with head_dim 64 or 128 on sm_80+ run on tensor cores (window_attention_mma.cuh) when their inputs are
// 16-byte aligned; everything else (fp32, other head dims up to kSimtMaxDim, sm_75, misaligned views) on CUDA cores
// (window_attention_simt.cuh). Both compute the mask of
// kforcing/attention.h without forming it, write lse (fp32, natural log) for the backward, and make no host sync.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>

#include "kforcing/cuda_utils.cuh"
#include "kforcing/dispatch.h"
#include "window_attention_mma.cuh"
#include "window_attention_simt.cuh"

namespace kforcing::cuda {
namespace {

constexpr int64_t kMaxGridY = 65535;

// The tensor-core kernels stage rows with 16-byte loads, so every tensor they read must start 16-byte aligned
// (a contiguous view at an odd element offset does not).
constexpr uintptr_t kMmaAlignment = 16;

// Tensor cores for bf16/fp16 at head_dim 64 or 128 on sm_80+, when every input is aligned; else CUDA cores.
bool use_tensor_cores(const at::Tensor& q, std::initializer_list<const at::Tensor*> inputs) {
  const int64_t dim = q.size(3);
  const bool half_type = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  bool aligned = true;
  for (const at::Tensor* t : inputs) {
    aligned = aligned && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % kMmaAlignment == 0;
  }
  return half_type && (dim == 64 || dim == 128) && aligned &&
         at::cuda::getCurrentDeviceProperties()->major >= mma::kMinMajor;
}

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const WindowLayout& layout,
                            double scale) {
  AttentionParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.layout = layout;
  p.batch = q.size(0);
  p.heads = q.size(2);
  p.kv_heads = k.size(2);
  p.dim = q.size(3);
  p.scale = static_cast<float>(scale);
  return p;
}

void check_cuda_limits(const at::Tensor& q, const char* op) {
  KF_CHECK_VALUE(q.size(3) <= kSimtMaxDim, op, "head_dim ", q.size(3), " is above the CUDA kernels' limit of ",
                 kSimtMaxDim);
  KF_CHECK_VALUE(ceil_div(q.size(1), kSimtWarps) <= kMaxGridY, op, "sequence of ", q.size(1),
                 " rows is above the CUDA kernels' limit of ", kMaxGridY * kSimtWarps);
}

// Above 48 KB of dynamic shared memory a kernel must ask for it (per device, so at every launch).
constexpr size_t kDefaultSharedMemory = 48 * 1024;

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= kDefaultSharedMemory) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// The tensor-core kernels: forward over (batch * heads, query blocks), backward over (batch * kv_heads, key tiles).
template <typename T, int D>
void launch_mma(bool backward, const AttentionParams& p, cudaStream_t stream) {
  const auto kernel = backward ? mma_backward_kernel<T, D> : mma_forward_kernel<T, D>;
  const size_t smem = backward ? mma_backward_smem<D>() : mma_forward_smem<D>();
  const dim3 grid(p.batch * (backward ? p.kv_heads : p.heads), ceil_div(p.seq(), backward ? kMmaKeys : kMmaRows));
  allow_shared_memory(kernel, smem);
  kernel<<<grid, kMmaWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_mma(bool backward, const AttentionParams& p, cudaStream_t stream) {
  if (p.dim == 64) {
    launch_mma<T, 64>(backward, p, stream);
  } else {
    launch_mma<T, 128>(backward, p, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> window_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, int64_t num_windows,
                                                         int64_t window_size, double scale) {
  constexpr const char* op = "window_attention";
  const WindowLayout layout = check_window_attention_args(q_in, k_in, v_in, num_windows, window_size,
                                                          {at::kFloat, at::kBFloat16, at::kHalf}, op);
  check_cuda_limits(q_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  AttentionParams p = make_params(q, k, v, layout, scale);
  p.o = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  KF_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "window_attention_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (use_tensor_cores(q, {&q, &k, &v})) return launch_mma<scalar_t>(false, p, stream);
    }
    const dim3 grid(p.batch * p.heads, ceil_div(p.seq(), kSimtWarps));
    simt_forward_kernel<scalar_t><<<grid, kSimtWarps * 32, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t num_windows, int64_t window_size, double scale) {
  constexpr const char* op = "window_attention_backward";
  const WindowLayout layout = check_window_attention_args(q_in, k_in, v_in, num_windows, window_size,
                                                          {at::kFloat, at::kBFloat16, at::kHalf}, op);
  check_window_attention_backward_args(grad_out_in, q_in, out_in, lse_in, op);
  check_cuda_limits(q_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {at::empty_like(q), dk, dv};
  at::Tensor delta = at::empty_like(lse);
  AttentionParams p = make_params(q, k, v, layout, scale);
  p.out = out.const_data_ptr();
  p.grad_out = grad_out.const_data_ptr();
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.delta = delta.mutable_data_ptr<float>();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dq;
  KF_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "window_attention_backward_cuda", [&] {
    const dim3 row_grid(p.batch * p.heads, ceil_div(p.seq(), kSimtWarps));
    row_delta_kernel<scalar_t><<<row_grid, kSimtWarps * 32, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (use_tensor_cores(q, {&q, &k, &v, &grad_out, &out})) {
        const at::Tensor dq_acc = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
        p.dq_acc = dq_acc.mutable_data_ptr<float>();
        launch_mma<scalar_t>(true, p, stream);
        dq = dq_acc.to(q.scalar_type());
        return;
      }
    }
    dq = at::empty_like(q);
    p.o = dq.mutable_data_ptr();
    simt_dq_kernel<scalar_t><<<row_grid, kSimtWarps * 32, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 key_grid(p.batch * p.kv_heads, ceil_div(p.seq(), kSimtWarps));
    simt_dkdv_kernel<scalar_t><<<key_grid, kSimtWarps * 32, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(kforcing, CUDA, m) {
  m.impl("window_attention", &window_attention_cuda);
  m.impl("window_attention_backward", &window_attention_backward_cuda);
}

}  // namespace kforcing::cuda
