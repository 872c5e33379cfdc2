"""Every numerical tolerance of the test suite, in one place.

Attention-like kernels use flash-attention's criterion: the kernel's error against a float64 reference may be at
most ATTENTION_FACTOR times the error of plain PyTorch computing in the same precision, plus a small floor.
"""

import torch

ATTENTION_FACTOR = 2.0
# Floors added to the criterion: below these the comparison is all rounding noise.
ATTENTION_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}

# noise_embedding: fp32 kernels must be within this relative error of float64.
EMBEDDING_FP32_RTOL = 1e-5

# Training on the kernels vs under kforcing_ops.use_reference(): the logged loss of every step (a few dozen steps of
# a tiny model) within this relative difference. Kernel and reference differ by float32 rounding per op; AdamW
# and the EMA carry it forward, so the curves drift apart slowly rather than staying bit-identical.
CONVERGENCE_LOSS_RTOL = 1e-3


# The model on the kernels vs under kforcing_ops.use_reference(): outputs, and gradients of the parameters.
KERNEL_VS_REFERENCE = dict(atol=2e-5, rtol=1e-4)
GRADIENTS_KERNEL_VS_REFERENCE = dict(atol=1e-5, rtol=1e-4)
# One float32 model computing the same rows in two layouts (a prefix vs the whole sequence, a window vs its
# unrolled sequence): only the order of float32 sums differs.
SAME_ROWS_FP32 = dict(atol=1e-5, rtol=1e-5)
# Decoding over the KV cache (one step at a time) vs the full forward pass.
CACHED_VS_FULL = dict(atol=1e-4, rtol=1e-4)
# 2 DDP processes vs 1 process with gradient accumulation: weights after training, and logged losses.
DDP_WEIGHTS = dict(atol=2e-5, rtol=1e-4)
DDP_LOSS_ABS = 1e-4
# A perplexity against its direct float64 computation; an agreement recomputed from a saved checkpoint.
PERPLEXITY_REL = 1e-5
RECOMPUTED_AGREEMENT_ABS = 1e-9
# An untrained teacher's first validation loss: log(vocabulary size), give or take.
CHANCE_LOSS_ABS = 0.3
# window_loss on hand-built logits: a loss of 10 nats.
HAND_BUILT_LOSS_ABS = 1e-3
# A reference model's perplexity that must NOT equal another's.
DIFFERENT_PERPLEXITY_REL = 1e-2


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
# A Hugging Face model's logits through kforcing's attention vs through transformers' sdpa attention (same weights):
# float64 agrees to rounding, float32 within the attention kernels' tolerance. transformers' eager attention computes
# its softmax in float32 even for a float64 model, so against it float64 agrees only to float32 rounding.
HF_FP64 = dict(atol=1e-11, rtol=1e-11)
HF_FP32 = dict(atol=2e-5, rtol=1e-4)
HF_EAGER_FP64 = dict(atol=1e-5, rtol=1e-5)

# decode_linear against float64 (fp32 products and sums, x widened from bf16 exactly): relative to the size of the
# dot product, sum |x| |w|, a few fp32 roundings per term.
DECODE_LINEAR_REL = 1e-5
