"""Decode linear layers: kforcing_ops.decode_linear against torch's GEMM, as GB/s of weights read, beside the
machine's read bandwidth, for 1 to 16 rows (and a few more, to show where torch's GEMM takes over).

A "pass" runs every linear layer of a preset once (each block's wqkv, wo, fc, proj, then the LM head), the way a
decode step does, on --rows rows of activations. To keep the weights out of cache the run holds enough copies of
the preset's layers to fill --min-mb and cycles through them. Each round times, interleaved:
  read      torch.sum over one --min-mb buffer: the machine's read bandwidth in this run (the roofline)
  kernel    kforcing_ops.decode_linear (fp32 or bf16 weights, fp32 activations)
  torch     torch.nn.functional.linear: fp32 weights with fp32 activations; for bf16 weights, bf16 activations
            (torch has no fp32 x bf16 linear; its bf16 GEMM is the nearest thing)
Reported per (preset, weight dtype, rows): ms per pass, GB/s of weights, % of the read bandwidth, kernel / torch
time, and the pass's cost relative to one row (kernel). Medians over --repeats rounds.

Targets (CPU, 2 threads): fp32 at 1-16 rows >= 75% of the read bandwidth; 8 rows <= 1.15x one row; bf16 weights
>= 1.8x the fp32 kernel's rows per second at one row. GPU: >= 80% of HBM bandwidth at 1-16 rows.

Examples:
  python bench/bench_linear.py                        # small and base presets, fp32 and bf16, rows 1..128
  python bench/bench_linear.py --presets small --rows 1 4 16 --dtypes float32 --no-save
"""

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kforcing_ops  # noqa: E402
from kforcing.models.transformer import ModelConfig, PRESETS  # noqa: E402


def layer_shapes(config):
    """(out_features, in_features) of every linear layer a decode step of `config` runs, in order."""
    h, d = config.n_embd, config.head_dim
    block = [((config.n_head + 2 * config.n_kv_head) * d, h), (h, config.n_head * d),
             (config.mlp_ratio * h, h), (h, config.mlp_ratio * h)]
    return block * config.n_layer + [(config.vocab_size, h)]


def weight_sets(shapes, dtype, min_bytes, device):
    """Copies of the layers, enough to hold min_bytes (at least 2), so that a cycle through them misses cache."""
    per_copy = sum(n * k for n, k in shapes) * torch.tensor([], dtype=dtype).element_size()
    copies = max(2, -(-int(min_bytes) // per_copy))
    return [[torch.randn(n, k, device=device).to(dtype) for n, k in shapes] for _ in range(copies)], per_copy


def time_pass(fn, sets, inputs, device):
    """Seconds per pass: one pass over each copy in turn, the median pass time of the cycle's total."""
    def cycle():
        for layers in sets:
            for w in layers:
                fn(inputs[w.shape[1]], w)
    cycle()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    cycle()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(sets)


def read_bandwidth(buffer, device):
    start = time.perf_counter()
    buffer.sum()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return buffer.numel() * buffer.element_size() / (time.perf_counter() - start)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=sorted(PRESETS),
                        help="model presets whose layer shapes are timed")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128],
                        help="rows of activations per pass (batch x tokens of a decode step)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="weight dtypes")
    parser.add_argument("--min-mb", type=float, default=400.0,
                        help="MB of weights cycled through (above the last-level cache: this CPU has 300 MB)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    if not kforcing_ops._ext.has_kernel("decode_linear", device):
        parser.error(f"this build has no {device.type} kernel for decode_linear")
    torch.manual_seed(0)
    buffer = torch.randn(int(args.min_mb * 1e6 / 4), device=device)
    print(f"decode linear layers on {common.device_name(device)}", flush=True)

    rows = []
    with torch.no_grad():
        for preset in args.presets:
            config = ModelConfig.from_preset(preset)
            shapes = layer_shapes(config)
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                sets, per_copy = weight_sets(shapes, dtype, args.min_mb * 1e6, device)
                one_row = None
                for m in args.rows:
                    x = {k: torch.randn(m, k, device=device) for k in {k for _, k in shapes}}
                    x_torch = x if dtype == torch.float32 else {k: v.to(dtype) for k, v in x.items()}
                    times = {"kernel": [], "torch": [], "read": []}
                    for _ in range(args.repeats):
                        times["read"].append(read_bandwidth(buffer, device))
                        times["kernel"].append(time_pass(kforcing_ops.decode_linear, sets, x, device))
                        times["torch"].append(time_pass(F.linear, sets, x_torch, device))
                    kernel, torch_time = statistics.median(times["kernel"]), statistics.median(times["torch"])
                    read = statistics.median(times["read"])
                    one_row = kernel if m == args.rows[0] else one_row
                    row = {"preset": preset, "weights": dtype_name, "rows": m, "mb": per_copy / 1e6,
                           "kernel_ms": 1e3 * kernel, "torch_ms": 1e3 * torch_time,
                           "kernel_gbs": per_copy / kernel / 1e9, "torch_gbs": per_copy / torch_time / 1e9,
                           "read_gbs": read / 1e9, "roofline": per_copy / kernel / read,
                           "vs_torch": statistics.median(k / t for k, t in zip(times["kernel"], times["torch"])),
                           "vs_first_row": kernel / one_row}
                    rows.append(row)
                    print(f"{preset} {dtype_name} rows {m:3d}: kernel {row['kernel_ms']:.2f} ms "
                          f"({row['kernel_gbs']:.1f} GB/s, {100 * row['roofline']:.0f}% of {row['read_gbs']:.1f}), "
                          f"torch {row['torch_ms']:.2f} ms ({row['torch_gbs']:.1f} GB/s), "
                          f"kernel/torch {row['vs_torch']:.2f}, vs {args.rows[0]} row(s) {row['vs_first_row']:.2f}x",
                          flush=True)
                del sets

    columns = [("preset", "preset", "{}"), ("weights", "weights", "{}"), ("mb", "MB / pass", "{:.0f}"),
               ("rows", "rows", "{}"), ("kernel_ms", "kernel ms", "{:.2f}"), ("kernel_gbs", "kernel GB/s", "{:.1f}"),
               ("roofline", "% of read BW", "{:.0%}"), ("torch_ms", "torch ms", "{:.2f}"),
               ("torch_gbs", "torch GB/s", "{:.1f}"), ("vs_torch", "kernel / torch", "{:.2f}"),
               ("vs_first_row", f"cost vs {args.rows[0]} row", "{:.2f}x"), ("read_gbs", "read BW GB/s", "{:.1f}")]
    table = common.markdown_table(rows, columns)
    note = ("torch: F.linear with fp32 activations for fp32 weights, and with bf16 activations for bf16 weights "
            "(torch's bf16 GEMM; the kernel keeps fp32 activations). Read BW: torch.sum over a "
            f"{args.min_mb:.0f} MB buffer, timed in the same rounds.")
    common.report("linear", device, rows, f"{table}\n\n{note}", args.no_save)


if __name__ == "__main__":
    main()
