"""Every numerical tolerance of the test suite, in one place.

Attention-like kernels use flash-attention's criterion: the kernel's error against a float64 reference may be at
most ATTENTION_FACTOR times the error of plain PyTorch computing in the same precision, plus a small floor.
"""

import torch

ATTENTION_FACTOR = 2.0
# Floors added to the criterion: below these the comparison is all rounding noise.
ATTENTION_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}

# noise_embedding: fp32 kernels must be within this relative error of float64 (issue 4).
EMBEDDING_FP32_RTOL = 1e-5


def max_error(got, want):
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def assert_within_pytorch_error(got, plain, exact, dtype, what=""):
    """|got - exact| <= ATTENTION_FACTOR * |plain - exact| + floor (flash-attention's test criterion)."""
    kernel_error, torch_error = max_error(got, exact), max_error(plain, exact)
    bound = ATTENTION_FACTOR * torch_error + ATTENTION_FLOOR[dtype]
    assert kernel_error <= bound, (
        f"{what}: kernel error {kernel_error:.3g} > {ATTENTION_FACTOR} x PyTorch's {torch_error:.3g} + "
        f"{ATTENTION_FLOOR[dtype]:.0e}")

# inverse_cdf_sample: fp32-family logits use fp32 exp and fp64 sums, so a kernel may differ from the float64
# reference only when u lies this close (relative) to a CDF boundary; float64 logits are sampled in float64.
SAMPLER_BOUNDARY_TOLERANCE = 1e-6
SAMPLER_FLOAT64_BOUNDARY_TOLERANCE = 1e-12
