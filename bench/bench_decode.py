"""End-to-end decode speed: generate_ar vs generate_kforcing (k = 1..4), same backbone, same machine, one run.

For each batch size, the AR teacher (kforcing.models.transformer.ARModel) and a push-forward student built from it
(PushForwardLM.from_teacher, same backbone weights; random weights are fine for speed) generate
--new-tokens tokens after a --prompt-len token prompt:
  AR          kforcing.decoding.generate.generate_ar: one token per pass, inverse-CDF sampling from explicit uniforms
  K-Forcing   kforcing.decoding.generate.generate_kforcing: [prompt | k hints] then [k committed | k hints] per pass
Each measurement is a whole generate call (prefill included). After one warm-up call of each decoder, --repeats
rounds call every decoder once, interleaved, so that load spikes on a shared machine hit all of them alike.
Reported: median [p20, p80] seconds per call, tokens/s and ms per pass (from the median), and the speedup of
K-Forcing over AR: the median over rounds of (AR time / K-Forcing time) in the same round. EOS stopping is off,
so every call produces exactly batch x --new-tokens tokens.

With --linear both (the default) every decoder runs twice in the same rounds: its decode passes' linear layers on
kforcing_ops.decode_linear (the default) and on torch's GEMM (`kforcing_ops.nn.torch_linears()`, the "before");
"vs torch GEMM" is the median over rounds of (time with torch's GEMM / time with the kernel). --verified adds a
draft student's verified round at the largest k (--pathway, default chain), pinned and adaptive (random weights:
its drafts are rarely accepted, so read the pinned row's ms/pass and "AR steps/pass", and the adaptive row's
speedup: the worst case of adaptive drafting, which should fall back to AR steps).

Targets: CPU, `small` preset, batch 1: k=4 >= 2.5x AR. GPU, `base` preset, batch 1..256: k=4 >= 3.5x AR.
Writes bench/results/decode_<cpu|cuda>.{json,md} (tagged with device, torch version and git sha).

Examples:
  python bench/bench_decode.py                         # CPU defaults: small, batch 1 8 32
  python bench/bench_decode.py --device cuda --preset base --dtype bfloat16 --batch 1 8 32 64 128 256
"""

import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kforcing.decoding.generate import generate_ar, generate_kforcing  # noqa: E402
from kforcing.students.draft.decode import generate_with_drafts  # noqa: E402
from kforcing.students.draft.student import DraftStudent, HeadConfig  # noqa: E402
from kforcing_ops.nn import torch_linears  # noqa: E402
from kforcing.evaluation.metrics import time_interleaved  # noqa: E402
from kforcing.models.transformer import ARModel, ModelConfig, PRESETS  # noqa: E402
from kforcing.students.push_forward.model import PushForwardLM  # noqa: E402


def profile(teacher, student, config, batch, k, args, options, device):
    """Print where one generate call spends its time, for AR and K-Forcing at k (after one warm-up call each)."""
    prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len)).tolist()
    runs = {"AR": lambda: generate_ar(teacher, prompts, args.new_tokens, seed=args.seed, **options),
            f"k={k}": lambda: generate_kforcing(student, prompts, args.new_tokens, k=k, seed=args.seed, **options)}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in runs.items():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=activities) as prof:
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\n### {name}, batch {batch}: {out.num_passes} passes")
        print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model preset (default: small on CPU, base on GPU)")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch sizes (default: CPU 1 8 32; GPU 1 8 32 64 128 256)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4], help="K-Forcing tokens per pass")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per measurement")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model and KV-cache dtype (auto: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (both loops)")
    parser.add_argument("--cuda-graph", action="store_true", help="replay the decode step as a CUDA graph")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed")
    parser.add_argument("--linear", default="both", choices=["kernel", "torch", "both"],
                        help="decode passes' linear layers: kforcing_ops.decode_linear, torch's GEMM, or both "
                             "side by side")
    parser.add_argument("--verified", action="store_true",
                        help="also time a draft student's verified rounds at the largest k, pinned and adaptive "
                             "(random weights)")
    parser.add_argument("--pathway", default="chain", choices=["chain", "trunk", "head"],
                        help="the draft student of --verified (one block for chain and head)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile one call of AR and of K-Forcing at the largest k (first batch "
                             "size) with torch.profiler and print the ops that take the most device time")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="kforcing_ops.*reference", category=RuntimeWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    preset = args.preset or ("base" if device.type == "cuda" else "small")
    batches = args.batch or ([1, 8, 32, 64, 128, 256] if device.type == "cuda" else [1, 8, 32])
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    config = ModelConfig.from_preset(preset)
    if args.prompt_len + args.new_tokens + max(args.k) > config.max_seq_len:
        parser.error(f"--prompt-len + --new-tokens must fit the preset's max_seq_len={config.max_seq_len}")

    torch.manual_seed(args.seed)
    teacher = ARModel(config).to(device=device, dtype=dtype).eval()
    student = PushForwardLM.from_teacher(teacher, max(args.k)).eval()
    options = {"compile": args.compile, "cuda_graph": args.cuda_graph}
    print(f"{preset}: {teacher.num_params() / 1e6:.1f}M parameters, {args.dtype} -> {dtype}, "
          f"{common.device_name(device)}", flush=True)

    if args.profile:
        profile(teacher, student, config, batches[0], max(args.k), args, options, device)
        return

    drafter = None
    if args.verified:
        layers = {"trunk": {}, "chain": dict(num_layers=1), "head": dict(num_layers=1)}[args.pathway]
        drafter = DraftStudent.from_teacher(teacher, HeadConfig(max_k=max(args.k), pathway=args.pathway, **layers))
    linears = ["kernel", "torch"] if args.linear == "both" else [args.linear]

    def with_linear(linear, fn):
        def run():
            if linear == "kernel":
                return fn()
            with torch_linears():
                return fn()
        return run

    rows = []
    for batch in batches:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len)).tolist()
        decoders = {"AR": lambda: generate_ar(teacher, prompts, args.new_tokens, seed=args.seed, **options)}
        for k in args.k:
            decoders[f"k={k}"] = lambda k=k: generate_kforcing(student, prompts, args.new_tokens, k=k,
                                                               seed=args.seed, **options)
        if drafter is not None:
            decoders[f"verified k={max(args.k)}"] = lambda: generate_with_drafts(
                drafter, prompts, args.new_tokens, k=max(args.k), seed=args.seed, verify=True)
            decoders["verified adaptive"] = lambda: generate_with_drafts(drafter, prompts, args.new_tokens,
                                                                         seed=args.seed, verify=True)
        runs = {(name, linear): with_linear(linear, fn) for linear in linears for name, fn in decoders.items()}
        measured = time_interleaved(runs, device, args.repeats)
        for (name, linear), (times, out) in measured.items():
            ar_times = measured[("AR", linear)][0]
            stats = common.percentiles(times)
            ar_ms_per_pass = 1e3 * statistics.median(ar_times) / measured[("AR", linear)][1].num_passes
            row = {"batch": batch, "decoder": name, "linear": linear, "time_s": stats, "passes": out.num_passes,
                   "tokens_per_s": batch * args.new_tokens / stats["median"],
                   "ms_per_pass": 1e3 * stats["median"] / out.num_passes,
                   "speedup_vs_ar": statistics.median(a / t for a, t in zip(ar_times, times))}
            row["ar_steps_per_pass"] = row["ms_per_pass"] / ar_ms_per_pass
            if linear == "kernel" and ("torch" in linears):
                before = measured[(name, "torch")][0]
                row["vs_torch_gemm"] = statistics.median(b / t for b, t in zip(before, times))
            rows.append(row)
            print(f"batch {batch:4d} {name:12s} {linear:6s}: {common.fmt_time(stats)} per call, {row['passes']} "
                  f"passes, {row['tokens_per_s']:.0f} tokens/s, {row['ms_per_pass']:.2f} ms/pass "
                  f"({row['ar_steps_per_pass']:.2f} AR steps), {row['speedup_vs_ar']:.2f}x AR", flush=True)

    columns = [("batch", "batch", "{}"), ("decoder", "decoder", "{}"), ("linear", "linear layers", "{}"),
               ("time", "time per call", "{}"), ("passes", "passes", "{}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
               ("ms_per_pass", "ms/pass", "{:.2f}"), ("ar_steps_per_pass", "AR steps/pass", "{:.2f}"),
               ("speedup_vs_ar", "speedup vs AR", "{:.2f}x"), ("vs_torch_gemm", "vs torch GEMM", "{:.2f}x")]
    shown = [dict(r, time=common.fmt_time(r["time_s"])) for r in rows]
    table = common.markdown_table(shown, columns)
    summary = {k: statistics.median([r["speedup_vs_ar"] for r in rows if r["decoder"] == f"k={k}"
                                     and r["linear"] == linears[0]]) for k in args.k}
    print()
    print(table)
    print("\nmedian speedup over AR across batch sizes: "
          + ", ".join(f"k={k}: {s:.2f}x" for k, s in summary.items()))
    if not args.no_save:
        settings = {"preset": preset, "params": teacher.num_params(), "dtype": str(dtype).replace("torch.", ""),
                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                    "compile": args.compile, "cuda_graph": args.cuda_graph, "threads": torch.get_num_threads(),
                    "linear": args.linear, "verified_pathway": args.pathway if args.verified else None,
                    "command": " ".join(["python", "bench/bench_decode.py", *(argv or sys.argv[1:])])}
        for path in common.save("decode", device, rows, table, extra={"settings": settings}):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
