"""decode_linear: the linear layers of a decode step, streaming each weight once for all of the step's rows."""

import torch

from . import _checks, _ext, reference


def decode_linear(x, weight, bias=None):
    """y = x @ weight^T + bias for the few rows of a decode step, at the memory roofline. Inference only.

    Args:
        x: (..., K) float32 or bfloat16, any strides; every leading dim is a row (M rows in all).
        weight: (N, K) float32 or bfloat16 (nn.Linear's layout), any row stride. bf16 weights are widened to fp32
            in registers: half the bytes to read, the arithmetic of an fp32 weight holding the same values.
        bias: optional (N,) float32 or bfloat16.

    Returns:
        (..., N) in x's dtype. Every product and sum is fp32 (a bf16 x is widened first).

    Made for M = 1 to 16 (one to a few decode rows per sequence, a few sequences): it reads W once per call and
    computes every row from it, where a GEMM tuned for large M streams a few rows' weights at a fraction of the
    machine's bandwidth. Any M is accepted; past a few dozen rows torch's GEMM is faster (see
    bench/bench_linear.py).

    Row invariance: a row's output is bitwise the same whatever other rows share the call, and wherever it sits
    among them, for any M (CPU: a fixed chain of vector FMAs over K per (row, output), then a fixed-order
    horizontal sum; CUDA: a fixed per-lane order and a fixed warp reduction). So one k-row decode pass gives the
    same logits as k one-row passes, and a sequence decodes the same alone or in a batch. Results may differ
    between builds (AVX-512, AVX2, CUDA), and from torch.nn.functional.linear in the last bits.

    Not differentiable: with grad mode on and an input that requires grad it raises RuntimeError; use
    torch.nn.functional.linear for training (kforcing's models do: only their no-grad decode passes call this).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError(
            "kforcing_ops.decode_linear is inference-only and has no backward: call it under torch.no_grad() "
            "(or on tensors that do not require grad), and use torch.nn.functional.linear for training")
    if _ext.use_kernel("decode_linear", x.device):
        return torch.ops.kforcing.decode_linear(x, weight, bias)
    return reference.decode_linear(x, weight, bias)


@torch.library.register_fake("kforcing::decode_linear")
def _decode_linear_fake(x, weight, bias=None):
    _checks.decode_linear(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _no_backward(ctx, grad):
    raise RuntimeError("kforcing.decode_linear is inference-only and has no backward; use "
                       "torch.nn.functional.linear for training")


torch.library.register_autograd("kforcing::decode_linear", _no_backward,
                                setup_context=lambda ctx, inputs, output: None)
