"""Runs every CUDA kernel once on small, odd shapes, and on the shapes that stress tiling and bounds, then captures
and replays whole decode steps as CUDA graphs: for compute-sanitizer in scripts/gpu_check.sh (memcheck reports any
access outside a buffer).

    python scripts/cuda_smoke.py kernels   # run with PYTORCH_NO_CUDA_MEMORY_CACHING=1: every buffer its own allocation
    python scripts/cuda_smoke.py graphs    # graph capture needs torch's caching allocator
"""

import math
import sys

import torch

import kforcing_ops as ko
from kforcing.decoding.generate import generate_ar, generate_kforcing
from kforcing.models.transformer import ARModel, ModelConfig
from kforcing.students.push_forward.model import PushForwardLM

dev = "cuda"


def kernels():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(37, 5003, device=dev, dtype=dtype)
        u = torch.rand(37, device=dev)
        ko.inverse_cdf_sample(logits, u)
        ko.inverse_cdf_sample(logits, u, 0.7, 13, 0.9)
        for dim in (40, 64, 128):
            q, k, v = (torch.randn(2, 19 + 7 * 3, h, dim, device=dev, dtype=dtype, requires_grad=True)
                       for h in (6, 2, 2))
            ko.window_attention(q, k, v, 7, 3).sum().backward()
            k_cache, v_cache = (torch.randn(2, 70, 2, dim, device=dev, dtype=dtype) for _ in range(2))
            lengths = torch.tensor([0, 60], dtype=torch.int32, device=dev)
            ko.window_attention_decode(q[:, :8].detach(), k[:, :8].detach(), v[:, :8].detach(), k_cache, v_cache,
                                       lengths, 4)
        weight = torch.randn(48, 4 * 8, device=dev, dtype=dtype, requires_grad=True)
        bias = torch.randn(48, device=dev, dtype=dtype, requires_grad=True)
        ko.noise_embedding(torch.rand(37, device=dev), 0.5, weight, bias).sum().backward()
        ko.noise_embedding(torch.rand(37, device=dev), torch.rand(37, device=dev), weight, bias).sum().backward()
        table = torch.randn(11, 48, device=dev, dtype=dtype, requires_grad=True)
        ids = torch.randint(0, 11, (3, 5), device=dev)
        ko.noise_conditioned_embedding(ids, table, torch.rand(3, 7, device=dev), torch.rand(3, device=dev), weight,
                                       bias).sum().backward()
        bad_tau = torch.tensor([math.nan, 0.7, -1.0], device=dev)  # invalid per-sequence taus: NaN rows, no fault
        ko.noise_conditioned_embedding(ids, table, torch.rand(3, 7, device=dev), bad_tau, weight, bias)

    # Multi-tile attention, forward and backward: windows around and beyond one 64-key tile, N = 67 context rows (not a
    # multiple of 64) with num_windows = N, so S spans many 64-row tiles; one kv head for 6 query heads (GQA group 6).
    context = 67
    for dtype in (torch.bfloat16, torch.float16):
        for dim in (64, 128):  # the tensor-core kernels
            for window in (63, 64, 65, 100, 130):
                seq = context + context * window
                q = torch.randn(1, seq, 6, dim, device=dev, dtype=dtype, requires_grad=True)
                k, v = (torch.randn(1, seq, 1, dim, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
                out = ko.window_attention(q, k, v, context, window)
                out.backward(torch.randn_like(out))
        # A misaligned (odd-offset) contiguous view takes the CUDA-core kernels.
        q, k, v = (torch.empty(1 + 300 * 4 * 64, device=dev, dtype=dtype)[1:].view(1, 300, 4, 64).normal_()
                   .requires_grad_() for _ in range(3))
        ko.window_attention(q, k, v, 40, 6).sum().backward()

    # Decode with several splits of the keys: lengths 0, 5 and 4000 in caches of 32,768 rows.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for dim in (64, 128):
            k_cache, v_cache = (torch.randn(3, 32768, 1, dim, device=dev, dtype=dtype) for _ in range(2))
            lengths = torch.tensor([0, 5, 4000], dtype=torch.int32, device=dev)
            q = torch.randn(3, 8, 6, dim, device=dev, dtype=dtype)
            k_new, v_new = (torch.randn(3, 8, 1, dim, device=dev, dtype=dtype) for _ in range(2))
            ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, lengths, 4)
            overflow = torch.tensor([0, 32766, 32768], dtype=torch.int32, device=dev)  # NaN rows, nothing written
            ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, overflow, 4)

    # The sampler at extreme temperatures (scalar and per row), with -inf logits and a partial last chunk.
    logits = torch.randn(16, 50257, device=dev)
    logits[torch.rand(16, 50257, device=dev) < 0.3] = -math.inf
    u = torch.rand(16, device=dev)
    u[:3] = torch.tensor([0.0, 1.0, 1 - 1e-7])
    for temperature in (1e-300, 1e-45, 1e30, 1e300):
        per_row = torch.full((16,), temperature, dtype=torch.float64, device=dev)
        for t in (temperature, per_row):
            for top_k, top_p in ((0, 1.0), (50, 1.0), (0, 0.9)):
                tokens = ko.inverse_cdf_sample(logits, u, t, top_k, top_p)
                assert bool(((tokens >= 0) & (tokens < 50257)).all()), (temperature, top_k, top_p)

    # The decode linear kernel: 1..64 rows (the row-invariant range), odd widths, a bias, both of its dtypes.
    for dtype in (torch.float32, torch.bfloat16):
        weight, bias = torch.randn(301, 97, device=dev, dtype=dtype), torch.randn(301, device=dev, dtype=dtype)
        for rows in (1, 3, 17, 64):
            ko.decode_linear(torch.randn(rows, 97, device=dev, dtype=dtype), weight, bias)


def graphs():
    # CUDA-graph capture and replay of whole decode steps (AR and K-Forcing), through every decode kernel.
    teacher = ARModel(ModelConfig.from_preset("tiny", vocab_size=300, max_seq_len=96)).to(dev, torch.bfloat16).eval()
    student = PushForwardLM.from_teacher(teacher, 4).eval()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    for _ in range(2):  # capture, then replay the pooled graphs
        generate_ar(teacher, prompts, 20, seed=1, cuda_graph=True)
        generate_kforcing(student, prompts, 20, k=4, seed=1, cuda_graph=True)


if __name__ == "__main__":
    sections = {"kernels": kernels, "graphs": graphs}
    chosen = sys.argv[1:] or list(sections)
    unknown = [name for name in chosen if name not in sections]
    if unknown:
        sys.exit(f"cuda_smoke.py: unknown section(s) {unknown}; choose from {list(sections)}")
    torch.manual_seed(0)
    for name in chosen:
        sections[name]()
        torch.cuda.synchronize()
        print(f"cuda smoke: {name} ran")
