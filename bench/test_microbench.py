"""Microbenchmarks of the kforcing ops on small CPU shapes: `pytest bench/ --benchmark-only`.

One pytest-benchmark group per op, each with its baseline, the pure-PyTorch reference (`kforcing_ops.use_reference()`),
in the same group, so `--benchmark-compare` and the group table read as kernel vs reference. The end-to-end
benchmarks with results files are the bench_*.py scripts; this file is not part of the `tests` suite.
"""

import contextlib

import pytest
import torch

import kforcing_ops

IMPLEMENTATIONS = {"kernel": contextlib.nullcontext, "reference": kforcing_ops.use_reference}

pytestmark = [pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning"),
              pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))]


def run(benchmark, implementation, fn, *args):
    def call():
        with IMPLEMENTATIONS[implementation]():
            return fn(*args)

    benchmark(call)


@pytest.mark.benchmark(group="inverse_cdf_sample")
def test_inverse_cdf_sample(benchmark, implementation):
    logits, u = torch.randn(64, 8192) * 3, torch.rand(64, dtype=torch.float64)
    run(benchmark, implementation, kforcing_ops.inverse_cdf_sample, logits, u, 0.9)


@pytest.mark.benchmark(group="window_attention fwd+bwd")
def test_window_attention_forward_backward(benchmark, implementation):
    context, windows, window = 64, 64, 4
    q = torch.randn(2, context + windows * window, 4, 32, requires_grad=True)
    k, v = (torch.randn(2, context + windows * window, 2, 32, requires_grad=True) for _ in range(2))

    def forward_backward():
        kforcing_ops.window_attention(q, k, v, windows, window).sum().backward()

    run(benchmark, implementation, forward_backward)


@pytest.mark.benchmark(group="window_attention_decode")
def test_window_attention_decode(benchmark, implementation):
    batch, rows, cache_len = 8, 8, 256
    q = torch.randn(batch, rows, 4, 32)
    k_new, v_new = torch.randn(batch, rows, 2, 32), torch.randn(batch, rows, 2, 32)
    k_cache, v_cache = torch.randn(batch, cache_len + rows, 2, 32), torch.randn(batch, cache_len + rows, 2, 32)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32)
    # n_commit = 0: the cache is read and left as it is, so every call measures the same step.
    run(benchmark, implementation, kforcing_ops.window_attention_decode, q, k_new, v_new, k_cache, v_cache,
        seqlens, 0)


@pytest.mark.benchmark(group="noise_embedding")
def test_noise_embedding(benchmark, implementation):
    u, weight, bias = torch.rand(4096), torch.randn(256, 4 * 128) * 0.02, torch.zeros(256)
    run(benchmark, implementation, kforcing_ops.noise_embedding, u, 0.9, weight, bias)
