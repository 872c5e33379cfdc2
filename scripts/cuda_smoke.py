"""Runs every CUDA kernel once on small, odd shapes: for compute-sanitizer in scripts/gpu_check.sh."""

import torch

import kforcing_ops as ko

torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    logits = torch.randn(37, 5003, device=dev, dtype=dtype)
    u = torch.rand(37, device=dev)
    ko.inverse_cdf_sample(logits, u)
    ko.inverse_cdf_sample(logits, u, 0.7, 13, 0.9)
    for dim in (40, 64, 128):
        q, k, v = (torch.randn(2, 19 + 7 * 3, h, dim, device=dev, dtype=dtype, requires_grad=True) for h in (6, 2, 2))
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
torch.cuda.synchronize()
print("cuda smoke: every kernel ran")
