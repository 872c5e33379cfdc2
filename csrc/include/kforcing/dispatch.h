#pragma once
// Dtype dispatch over exactly the dtypes a kernel supports, so no unused template is instantiated
// (each one costs build time, and CUDA builds compile every instantiation once per architecture).

#include <ATen/Dispatch.h>

// fp32, bf16, fp16: what the GPU kernels and the sampler accept.
#define KF_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// The above and fp64: the CPU sampler, which samples fp64 logits in fp64.
#define KF_DISPATCH_FLOAT_HALF_BF16_DOUBLE(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                                 AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))
