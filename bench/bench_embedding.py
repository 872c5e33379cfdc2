"""Benchmark noise_embedding against the unfused forms it replaces, forward and forward + backward.

Per M rows (H = 768, F = 384 by default), side by side in one run:
  kernel        kforcing_ops.noise_embedding, tau shared by all rows (a scalar, as one sequence's temperature)
  kernel_rows   kforcing_ops.noise_embedding with a tau per row (no folding: the full K = 4F product)
  dyadic        kernel with code="dyadic" (u's features from the exact phase frac(2^j u))
  binary        kernel with code="binary" (u's features are its binary digits)
  unfused       fp32 features (M, 4F), then a Linear in the weight's dtype: the best unfused form
  reference     float64 features, then a Linear (kforcing_ops.reference; the original implementation's form)
  gemm          (GPU) the bare dense GEMM of the same shape, (M, 4F) @ (4F, H), on precomputed features
Implementations are timed interleaved, round by round; speedups are medians of per-round ratios. Peak memory is
reported for the forward. TFLOP/s count 2 M 4F H, the unfused GEMM's work, so they compare directly
with the bare GEMM even though the shared-tau kernel only multiplies the u half (K = 2F).
Writes bench/results/embedding_<device>.{json,md}.
"""

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kforcing_ops  # noqa: E402
from kforcing_ops import reference  # noqa: E402


def unfused(u, tau, weight, bias):
    f = 10000.0 ** (-torch.arange(weight.shape[1] // 4, device=u.device, dtype=torch.float32) / (weight.shape[1] // 4))
    angle_u = 2 * math.pi * u.float()[:, None] * f
    tau = tau if isinstance(tau, torch.Tensor) else torch.full_like(u, tau)
    angle_tau = 2 * math.pi * tau.float()[:, None] * f
    features = torch.cat([angle_u.cos(), angle_u.sin(), angle_tau.cos(), angle_tau.sin()], dim=1)
    return F.linear(features.to(weight.dtype), weight, bias)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="M values; default: CPU 32 16384, GPU 32 16384 131072 (4x8, 8x512x4, 32x1024x4)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--freqs", type=int, default=384)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype; auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out, e.g. reference")
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    gpu = device.type == "cuda"
    dtype = (torch.bfloat16 if gpu else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    rows_list = args.rows or ([32, 16384, 131072] if gpu else [32, 16384])
    hidden, freqs = args.hidden, args.freqs
    weight = (torch.randn(hidden, 4 * freqs, device=device) * 0.02).to(dtype).requires_grad_()
    bias = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)

    impls = {
        "kernel": lambda u, tau_rows: kforcing_ops.noise_embedding(u, 0.8, weight, bias),
        "kernel_rows": lambda u, tau_rows: kforcing_ops.noise_embedding(u, tau_rows, weight, bias),
        "dyadic": lambda u, tau_rows: kforcing_ops.noise_embedding(u, 0.8, weight, bias, code="dyadic"),
        "binary": lambda u, tau_rows: kforcing_ops.noise_embedding(u, 0.8, weight, bias, code="binary"),
        "unfused": lambda u, tau_rows: unfused(u, tau_rows, weight, bias),
        "reference": lambda u, tau_rows: reference.noise_embedding(u, tau_rows, weight, bias),
    }
    impls = {name: fn for name, fn in impls.items() if name not in args.skip}
    results = []
    for rows in rows_list:
        make = lambda rows=rows: (torch.rand(rows, device=device), torch.full((rows,), 0.8, device=device))  # noqa
        full_flops = 2 * rows * 4 * freqs * hidden
        row = {"M": rows, "H": hidden, "F": freqs, "dtype": str(dtype)[6:]}
        grad = torch.randn(rows, hidden, device=device, dtype=dtype)

        def no_grad(fn):
            def run(*inputs):
                with torch.no_grad():
                    return fn(*inputs)
            return run

        forward = {name: no_grad(fn) for name, fn in impls.items()}
        if gpu:
            features = torch.randn(rows, 4 * freqs, device=device, dtype=dtype)
            forward["gemm"] = no_grad(lambda u, t: features @ weight.t())
        stats, ratios = common.compare(device, make, forward, rows * hidden * dtype.itemsize, args.min_run_time)
        backward = {name: (lambda u, t, fn=fn: fn(u, t).backward(grad)) for name, fn in impls.items()}
        stats_bwd, _ = common.compare(device, make, backward, rows * hidden * 4, args.min_run_time)
        for name in forward:
            row[f"{name}_fwd"] = stats[name]
            row[f"{name}_tflops"] = full_flops / stats[name]["median"] / 1e12
        for name, fn in impls.items():
            row[f"{name}_fwdbwd"] = stats_bwd[name]
            inputs = make()
            row[f"{name}_mem"] = common.peak_memory(device, lambda run=forward[name], inputs=inputs: run(*inputs))
            print(f"  M={rows} {name}: fwd {common.fmt_time(row[f'{name}_fwd'])}, fwd+bwd "
                  f"{common.fmt_time(row[f'{name}_fwdbwd'])}, peak {row[f'{name}_mem'] / 2**20:.1f} MiB", flush=True)
        if "unfused" in ratios:
            row["speedup_vs_unfused"] = ratios["unfused"]
        if gpu:
            row["kernel_vs_gemm"] = ratios["gemm"]
        row["feature_bytes"] = rows * 4 * freqs * 4
        results.append(row)

    names = list(impls) + (["gemm"] if gpu else [])
    columns = [("M", "M", "{}"), ("dtype", "dtype", "{}")]
    for name in names:
        columns += [(f"{name}_f", f"{name} fwd", "{}")]
        if name != "gemm":
            columns += [(f"{name}_fb", f"{name} fwd+bwd", "{}"), (f"{name}_mib", f"{name} peak MiB", "{:.1f}")]
        columns += [(f"{name}_tflops", f"{name} TFLOP/s", "{:.2f}")]
    columns += [("speedup_vs_unfused", "kernel speedup vs unfused (fwd)", "{:.2f}x"),
                ("feature_mib", "unfused feature tensor MiB", "{:.1f}")]
    if gpu:
        columns.append(("kernel_vs_gemm", "kernel speed / bare GEMM", "{:.2f}"))
    shown = []
    for r in results:
        extra = {"feature_mib": r["feature_bytes"] / 2**20}
        for name in names:
            extra[f"{name}_f"] = common.fmt_time(r[f"{name}_fwd"])
            if name != "gemm":
                extra[f"{name}_fb"] = common.fmt_time(r[f"{name}_fwdbwd"])
                extra[f"{name}_mib"] = r[f"{name}_mem"] / 2**20
        shown.append(dict(r, **extra))
    table = common.markdown_table(shown, columns)
    common.report("embedding", device, results, table, args.no_save)


if __name__ == "__main__":
    main()
