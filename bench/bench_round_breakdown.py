"""Where one drafting round's time goes: the default design's parts timed alone, beside the whole round and AR's step.

The default draft student (chain pathway: one block, a draft vocabulary of V/8, bf16 head weights) verifies k
rows per round and drafts k-1 tokens with k-1 head calls. One round of it is, in order:

  head, k rows     the head reads the rows the last round committed (their teacher features and tokens)
  readout          the head's feature -> draft logits (the teacher's final norm, the LM head's draft-vocabulary rows)
  sampler, 1 row   a draft from the draft logits, with its position's uniform
  head, 1 row      the draft fed back (k-2 of these; the last draft needs none)
  teacher, k rows  the verify pass: the teacher's blocks and full LM head over [exact | k-1 drafts]
  sampler, k rows  the teacher's tokens at the k positions, one call
  uniforms         the round's uniforms gathered from the request's table
and the rest (acceptance, the caches' advance, the output's bookkeeping) is the whole round minus its parts.

Each part runs alone on random weights at the preset's shapes, `--repeats` interleaved rounds of `--calls` calls,
eager or torch.compile'd (`--compile`: each part compiled on its own, the whole round as the decoder compiles it;
AR's step as `generate_ar(compile=True)` compiles it). "AR steps" = a part's ms / the AR step's ms in the same run;
"x per round" = how often a round runs it. The parts' sum need not equal the round (each part alone pays its own
call overhead, and the round's compiled graph fuses across parts): the difference is the last row.

Example:
  python bench/bench_round_breakdown.py --preset small --batch 1 --compile
"""

import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kforcing.decoding.compiled import compiled  # noqa: E402
from kforcing.decoding.generate import generate_ar  # noqa: E402
from kforcing.evaluation.metrics import time_interleaved  # noqa: E402
from kforcing.models.transformer import ARModel, KVCache, ModelConfig, PRESETS, cast_linear_weights  # noqa: E402
from kforcing.noise import counter_uniform  # noqa: E402
from kforcing.students.draft.decode import generate_with_drafts  # noqa: E402
from kforcing.students.draft.student import DraftStudent, HeadConfig, Sampling, sample_rows  # noqa: E402
from kforcing.teachers.protocol import decode_layers  # noqa: E402

SAMPLING = Sampling(0.7, 50, 0.9)


def teacher_rows(teacher, cache, ids):
    """The teacher over ids (B, T) at the cache's lengths, logits of every row; the cache's lengths stay."""
    start = cache.seqlens.clone()
    features = decode_layers(teacher, teacher.embed(ids), cache, ids.shape[1])
    logits = teacher.logits(features)
    cache.seqlens.copy_(start)
    return logits


def head_rows(student, cache, features, ids):
    """The chain head over (features, tokens) rows (B, T); the cache's lengths stay."""
    start = cache.seqlens.clone()
    hidden = student.head.decode(student.teacher, features, ids, cache, ids.shape[1])
    cache.seqlens.copy_(start)
    return hidden


def readout(student, layer, feature):
    return student.head.apply_readout(student.teacher, layer, feature)


def sampler(logits, u):
    return sample_rows(logits, u, SAMPLING)


def gather_uniforms(table, positions):
    return table.gather(1, positions)


def parts(teacher, student, batch, k, prompt_len, new_tokens, compile):
    """{name: (times a round runs it, fn)} of the round's parts, plus the AR step's and the whole round's calls."""
    config, device = teacher.config, teacher.device
    width, vocab = config.n_embd, student.head.config.draft_vocab or config.vocab_size
    cache = KVCache.for_model(teacher, batch, prompt_len + new_tokens + 2 * k)
    cache.seqlens.fill_(prompt_len)
    head_cache = KVCache(1, batch, prompt_len + new_tokens + 2 * k, config.n_kv_head, config.head_dim,
                         device=device, dtype=teacher.dtype)
    head_cache.seqlens.fill_(prompt_len)
    ids_k, ids_1 = (torch.randint(0, config.vocab_size, (batch, n), device=device) for n in (k, 1))
    features_k, features_1 = (torch.randn(batch, n, width, device=device) for n in (k, 1))
    layer = student.head.readout_layer(teacher)
    logits_k = torch.randn(batch, k, config.vocab_size, device=device)
    logits_1 = torch.randn(batch, 1, vocab, device=device)
    u_k, u_1 = torch.rand(batch, k, dtype=torch.float64), torch.rand(batch, 1, dtype=torch.float64)
    table = counter_uniform(0, torch.arange(batch)[:, None], torch.arange(prompt_len + new_tokens + 2 * k))
    positions = torch.arange(k)[None, :].repeat(batch, 1) + prompt_len
    step = compiled if compile else (lambda fn: fn)
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len)).tolist()
    return {
        f"head, {k} rows": (1, lambda f=step(head_rows): f(student, head_cache, features_k, ids_k)),
        "readout": (k - 1, lambda f=step(readout): f(student, layer, features_1)),
        "sampler, 1 row": (k - 1, lambda f=step(sampler): f(logits_1, u_1)),
        "head, 1 row": (k - 2, lambda f=step(head_rows): f(student, head_cache, features_1, ids_1)),
        f"teacher, {k} rows": (1, lambda f=step(teacher_rows): f(teacher, cache, ids_k)),
        f"sampler, {k} rows": (1, lambda f=step(sampler): f(logits_k, u_k)),
        "uniforms": (2, lambda f=step(gather_uniforms): f(table, positions)),
        # Whole calls: their per-pass time is a round's (an AR step's).
        "AR step": (None, lambda: generate_ar(teacher, prompts, new_tokens, seed=0, compile=compile,
                                              **vars(SAMPLING)).num_passes),
        "round": (None, lambda: generate_with_drafts(student, prompts, new_tokens, k=k, seed=0, compile=compile,
                                                     **vars(SAMPLING)).num_passes),
    }


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="teacher preset")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--k", type=int, default=4, help="rows of the verify pass (k-1 drafts)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per whole call")
    parser.add_argument("--calls", type=int, default=50, help="calls of a part per timed round")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds")
    parser.add_argument("--compile", action="store_true", help="time every part, the round and AR's step compiled")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="kforcing_ops.*reference", category=RuntimeWarning)
    device = common.resolve_device(args.device)
    meta = common.metadata(device)
    torch.manual_seed(0)
    teacher = ARModel(ModelConfig.from_preset(args.preset)).to(device).eval()
    student = DraftStudent.from_teacher(teacher, HeadConfig(num_layers=1, max_k=args.k, pathway="chain",
                                                            draft_vocab=teacher.config.vocab_size // 8)).eval()
    cast_linear_weights(student.head, torch.bfloat16)
    print(f"{common.device_name(device)}, torch {torch.__version__}, {args.preset}, batch {args.batch}, k={args.k}"
          f"{', compiled' if args.compile else ', eager'}", flush=True)
    found = parts(teacher, student, args.batch, args.k, args.prompt_len, args.new_tokens, args.compile)
    passes = {}

    def repeated(name, fn):
        def run():
            if name in ("AR step", "round"):
                passes[name] = fn()
                return
            for _ in range(args.calls):
                fn()
        return run

    with torch.no_grad():
        measured = time_interleaved({name: repeated(name, fn) for name, (_, fn) in found.items()}, device,
                                    args.repeats)
    ms = {name: 1e3 * statistics.median(times) / (passes[name] if name in passes else args.calls)
          for name, (times, _) in measured.items()}
    ar = ms["AR step"]
    rows, total = [], 0.0
    for name, (per_round, _) in found.items():
        if per_round is None:
            continue
        total += per_round * ms[name]
        rows.append({"part": name, "per_round": per_round, "ms": ms[name], "ms_per_round": per_round * ms[name],
                     "ar_steps": per_round * ms[name] / ar, "share": per_round * ms[name] / ms["round"]})
    rows.append({"part": "the rest (round - parts)", "per_round": 1, "ms": ms["round"] - total,
                 "ms_per_round": ms["round"] - total, "ar_steps": (ms["round"] - total) / ar,
                 "share": (ms["round"] - total) / ms["round"]})
    rows.append({"part": "whole round", "per_round": 1, "ms": ms["round"], "ms_per_round": ms["round"],
                 "ar_steps": ms["round"] / ar, "share": 1.0})
    rows.append({"part": "AR step", "per_round": "-", "ms": ar, "ms_per_round": ar, "ar_steps": 1.0,
                 "share": ar / ms["round"]})
    columns = [("part", "part", "{}"), ("per_round", "x per round", "{}"), ("ms", "ms per call", "{:.3f}"),
               ("ms_per_round", "ms per round", "{:.3f}"), ("ar_steps", "AR steps per round", "{:.2f}"),
               ("share", "share of the round", "{:.0%}")]
    settings = {"preset": args.preset, "batch": args.batch, "k": args.k, "compile": args.compile,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "calls": args.calls,
                "repeats": args.repeats, "threads": torch.get_num_threads(),
                "command": common.command_line("bench_round_breakdown.py", argv)}
    common.report_table("round_breakdown", device, rows, columns, settings, meta, args.no_save)

if __name__ == "__main__":
    main()
