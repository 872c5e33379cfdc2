"""Benchmark window_attention (training, forward + backward) and window_attention_decode against the alternatives.

Training, per N (k hint rows per window, num_windows = N, S = N (1 + k)), forward + backward, time and peak memory
(the peak above the inputs, and the workspace: the peak minus what every implementation must allocate, i.e. the
output, its lse and the three gradients):
  kernel       kforcing_ops.window_attention
  reference    the dense (S, S) staircase mask + SDPA (what the original K-Forcing implementation does)
  compiled     torch.compile of the reference
  flex         FlexAttention with the staircase mask_mod and its block mask, compiled (GPU only)
  causal       plain causal SDPA over the same S rows: a different mask with about as much work, as a yardstick
Decode, per (B, L), T new rows against caches of L rows (L - T cached), time and GB/s of K/V read:
  kernel       kforcing_ops.window_attention_decode
  reference    cat + masked SDPA + the in-place cache write
  flash_attn   flash_attn_with_kvcache, when flash-attn is importable
  flex_decode  FlexAttention over cat(cache, new) with the decode mask, compiled per shape (GPU only)
Implementations are timed interleaved, round by round; "x / kernel" columns are medians of per-round time ratios.
Writes bench/results/attention_<device>.{json,md}.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kforcing_ops  # noqa: E402
from kforcing_ops import reference  # noqa: E402


def staircase_inputs(batch, heads, dim, context, k, dtype, device):
    seq = context * (1 + k)
    return [torch.randn(batch, seq, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]


def flex_window_attention(context, k, seq, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        q_window = (q_idx - context) // k
        kv_window = (kv_idx - context) // k
        last_context = torch.where(q_idx < context, q_idx, q_window)
        sees_context = (kv_idx < context) & (kv_idx <= last_context)
        sees_hint = (q_idx >= context) & (kv_idx >= context) & (q_window == kv_window) & (kv_idx <= q_idx)
        return sees_context | sees_hint

    block_mask = create_block_mask(mask_mod, None, None, seq, seq, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k_, v: compiled(q.transpose(1, 2), k_.transpose(1, 2), v.transpose(1, 2),
                                     block_mask=block_mask).transpose(1, 2)


def causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def bench_training(args, device, dtype):
    rows = []
    for context in args.context:
        k, seq = args.k, context * (1 + args.k)
        impls = {
            "kernel": lambda q, k_, v: kforcing_ops.window_attention(q, k_, v, context, k),
            "reference": lambda q, k_, v: reference.window_attention(q, k_, v, context, k),
            "compiled": torch.compile(lambda q, k_, v: reference.window_attention(q, k_, v, context, k)),
        }
        if device.type == "cuda":
            impls["flex"] = flex_window_attention(context, k, seq, device)
            impls["causal"] = causal_sdpa
        impls = {name: fn for name, fn in impls.items() if name not in args.skip}
        make = lambda: (*staircase_inputs(args.batch, args.heads, args.dim, context, k, dtype, device),  # noqa: E731
                        torch.randn(args.batch, seq, args.heads, args.dim, device=device, dtype=dtype))
        row = {"N": context, "k": k, "S": seq, "dtype": str(dtype)[6:]}
        inputs = make()
        steps = {name: (lambda q, k_, v, grad, fn=fn: fn(q, k_, v).backward(grad)) for name, fn in impls.items()}
        stats, ratios = common.compare(device, lambda: inputs, steps, 4 * inputs[0].numel() * dtype.itemsize,
                                       args.min_run_time, rounds=args.rounds)
        for name, step in steps.items():
            row[name], row[f"{name}_x"] = stats[name], ratios[name]
            row[f"{name}_mem"] = common.peak_memory(device, lambda step=step: step(*inputs))
            print(f"  train N={context} {name}: {common.fmt_time(row[name])}, {ratios[name]:.2f}x the kernel's time, "
                  f"peak {row[f'{name}_mem'] / 2**20:.0f} MiB", flush=True)
        row["mem_ratio"] = row["kernel_mem"] / max(row["reference_mem"], 1)
        # What every implementation must allocate: the output, its lse row statistics and the three gradients.
        q, k_, v = inputs[:3]
        essential = (2 * q.numel() + k_.numel() + v.numel()) * dtype.itemsize + q.shape[0] * q.shape[2] * seq * 4
        for name in impls:
            row[f"{name}_workspace"] = max(row[f"{name}_mem"] - essential, 0)
        row["workspace_ratio"] = row["kernel_workspace"] / max(row["reference_workspace"], 1)
        rows.append(row)
    columns = [("N", "N", "{}"), ("S", "S", "{}"), ("dtype", "dtype", "{}")]
    for name in [n for n in ("kernel", "reference", "compiled", "flex", "causal") if n in rows[0]]:
        columns.append((f"{name}_t", f"{name} fwd+bwd", "{}"))
        if name != "kernel":
            columns.append((f"{name}_x", f"{name} / kernel", "{:.2f}x"))
    columns += [("kernel_mib", "kernel peak MiB", "{:.0f}"), ("reference_mib", "reference peak MiB", "{:.0f}"),
                ("mem_ratio", "kernel / reference peak", "{:.2f}"),
                ("kernel_ws", "kernel workspace MiB", "{:.1f}"), ("reference_ws", "reference workspace MiB", "{:.1f}"),
                ("workspace_ratio", "kernel / reference workspace", "{:.3f}")]
    shown = [dict(r, **{f"{n}_t": common.fmt_time(r[n]) for n in r if isinstance(r[n], dict)},
                  kernel_mib=r["kernel_mem"] / 2**20, reference_mib=r["reference_mem"] / 2**20,
                  kernel_ws=r["kernel_workspace"] / 2**20, reference_ws=r["reference_workspace"] / 2**20)
             for r in rows]
    return rows, common.markdown_table(shown, columns)


def decode_inputs(batch, max_len, new_rows, heads, kv_heads, dim, dtype, device):
    q = torch.randn(batch, new_rows, heads, dim, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(batch, new_rows, kv_heads, dim, device=device, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, max_len, kv_heads, dim, device=device, dtype=dtype) for _ in range(2))
    lengths = torch.full((batch,), max_len - new_rows, dtype=torch.int32, device=device)
    return q, k_new, v_new, k_cache, v_cache, lengths


def flash_decode():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return lambda q, k_new, v_new, k_cache, v_cache, lengths, n_commit: flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths, causal=True)


def flex_decode(max_len, new_rows, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention)
    masks = {}

    def run(q, k_new, v_new, k_cache, v_cache, lengths, n_commit):
        batch = q.shape[0]
        if batch not in masks:
            def mask_mod(b, h, q_idx, kv_idx):
                cached = (kv_idx < max_len) & (kv_idx < lengths[b])
                fresh = (kv_idx >= max_len) & (kv_idx - max_len <= q_idx)
                return cached | fresh
            masks[batch] = create_block_mask(mask_mod, batch, None, new_rows, max_len + new_rows, device=device)
        keys = torch.cat([k_cache, k_new], dim=1).transpose(1, 2)
        values = torch.cat([v_cache, v_new], dim=1).transpose(1, 2)
        return compiled(q.transpose(1, 2), keys, values, block_mask=masks[batch],
                        enable_gqa=q.shape[2] != k_new.shape[2]).transpose(1, 2)
    return run


def bench_decode(args, device, dtype):
    rows = []
    for heads, kv_heads, dim in args.decode_heads:
        for batch in args.decode_batch:
            for length in args.decode_len:
                impls = {"kernel": kforcing_ops.window_attention_decode,
                         "reference": reference.window_attention_decode}
                if device.type == "cuda":
                    if flash_decode() is not None:
                        impls["flash_attn"] = flash_decode()
                    impls["flex_decode"] = flex_decode(length, args.new_rows, device)
                impls = {name: fn for name, fn in impls.items() if name not in args.skip}
                make = lambda: decode_inputs(batch, length, args.new_rows, heads, kv_heads, dim, dtype,  # noqa: E731
                                             device)
                kv_bytes = 2 * batch * (length - args.new_rows) * kv_heads * dim * dtype.itemsize
                row = {"B": batch, "L": length, "T": args.new_rows, "H": heads, "H_kv": kv_heads, "D": dim}
                calls = {name: (lambda *a, fn=fn: fn(*a, args.new_rows // 2)) for name, fn in impls.items()}
                stats, ratios = common.compare(device, make, calls, kv_bytes, args.min_run_time, rounds=args.rounds)
                for name in impls:
                    row[name], row[f"{name}_x"] = stats[name], ratios[name]
                    row[f"{name}_GB/s"] = kv_bytes / row[name]["median"] / 1e9
                    print(f"  decode B={batch} L={length} H={heads}/{kv_heads} {name}: "
                          f"{common.fmt_time(row[name])}, {row[f'{name}_GB/s']:.0f} GB/s", flush=True)
                rows.append(row)
    names = [n for n in ("kernel", "reference", "flash_attn", "flex_decode") if rows and n in rows[0]]
    columns = [("B", "B", "{}"), ("L", "L", "{}"), ("H", "H", "{}"), ("H_kv", "H_kv", "{}"), ("D", "D", "{}")]
    for name in names:
        columns += [(f"{name}_t", name, "{}"), (f"{name}_GB/s", f"{name} GB/s", "{:.0f}")]
        if name != "kernel":
            columns.append((f"{name}_x", f"{name} / kernel", "{:.2f}x"))
    shown = [dict(r, **{f"{n}_t": common.fmt_time(r[n]) for n in names}) for r in rows]
    return rows, common.markdown_table(shown, columns)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--batch", type=int, default=4, help="training batch")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--context", type=int, nargs="+", default=[256, 512, 1024], help="training N values")
    parser.add_argument("--k", type=int, default=4, help="hint rows per window")
    parser.add_argument("--new-rows", type=int, default=8, help="decode: new rows T per step (half committed)")
    parser.add_argument("--decode-batch", type=int, nargs="+", default=None, help="default: CPU 1 8, GPU 1 8 64")
    parser.add_argument("--decode-len", type=int, nargs="+", default=None,
                        help="cache lengths L; default: CPU 512 4096, GPU 512 4096 32768")
    parser.add_argument("--decode-heads", type=lambda s: tuple(map(int, s.split(","))), nargs="+",
                        default=[(8, 8, 64), (32, 8, 128)], help="H,H_kv,D triples")
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out, e.g. compiled flex")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds: each times every implementation once; ratios are per-round medians")
    parser.add_argument("--only", choices=["train", "decode"], help="run one of the two parts")
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(args.dtype) or getattr(
        torch, args.dtype)
    gpu = device.type == "cuda"
    args.decode_batch = args.decode_batch or ([1, 8, 64] if gpu else [1, 8])
    args.decode_len = args.decode_len or ([512, 4096, 32768] if gpu else [512, 4096])
    torch._dynamo.config.recompile_limit = 64
    results, tables = {}, []
    if args.only != "decode":
        print(f"training, B={args.batch} H={args.heads} D={args.dim} k={args.k}, {dtype}", flush=True)
        results["train"], table = bench_training(args, device, dtype)
        tables.append(f"## Training: forward + backward (B={args.batch}, H={args.heads}, D={args.dim}, k={args.k}, "
                      f"{str(dtype)[6:]})\n\n{table}")
    if args.only != "train":
        print(f"decode, T={args.new_rows}, {dtype}", flush=True)
        results["decode"], table = bench_decode(args, device, dtype)
        tables.append(f"## Decode (T={args.new_rows} new rows, {args.new_rows // 2} committed, "
                      f"{str(dtype)[6:]})\n\n{table}")
    text = "\n\n".join(tables)
    common.report("attention", device, results, text, args.no_save)


if __name__ == "__main__":
    main()
