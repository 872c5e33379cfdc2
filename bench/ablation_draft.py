"""Ablation of the student's options at one wall-clock budget: each row changes one option from the default.

For every row, a short calibration run times the row's training step, then `kforcing.workflows.distill.distill` trains
it for as many steps as fit --minutes (so each row gets the same wall-clock budget, with its full learning-rate
schedule), and the result is evaluated on the same held-out prompts and seeds:

    tokens/pass   verified decoding (lossless: checked equal to AR sampling), k = 4, at the row's sampling settings
    accept j      the share of verification steps whose drafts 2..j were all accepted
    floor         the same for a u-blind drafter (drafts sampled from the teacher with independent uniforms)
    shuffle       acceptance at offset 2..k when the hint rows get another seed's uniforms (a chain row has none)
    quality       unverified samples (k tokens per pass, no penalty) vs the teacher's samples at the same settings:
                  perplexity under the teacher, unigram entropy, longest repeated n-gram

    speed         tokens/s over AR's, timed interleaved in the same process at each --speed-batches size (compiled
                  with --compile, AR too): verified at k = 4, adaptive (up to k-1 drafts or a plain AR step each
                  round), and unverified at k = 4

The default is `kforcing distill`'s own (chain pathway, one head block, categorical readout, vocabulary order,
temperature 0.7, top-k 50, top-p 0.9; a V/8 draft vocabulary on teachers with V >= 8192). The `head` and `trunk`
rows are the other drafting designs at the same budget. The `paper` row is `--paper`,
the original method (every weight fine-tuned, sinusoidal code, one-hot readout, progressive
self-forcing 1 -> 2 -> 4, vocabulary order, temperature 1). Its token rows are not the teacher's, so it cannot
verify: the table gives its coupled agreement per offset with the AR teacher instead (what verified decoding
would accept if its drafts were checked), and the quality of its samples.

Writes bench/results/ablation_draft_<device>/<date>_<sha>.{json,md} and, with matplotlib, a plot beside them.

    python bench/ablation_draft.py --teacher runs/demo/teacher --minutes 8.5   # the demo's budget: ~2.5 h
    python bench/ablation_draft.py --teacher runs/demo/teacher --rows default onehot --minutes 1
    python bench/ablation_draft.py --teacher runs/small/teacher --rows default head trunk trunk-lora-32 onepass \
        --minutes 8 --compile --speed-batches 1 8 32 --name design_comparison   # the drafting designs
"""

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kforcing.checkpoints import checkpoint as ckpt  # noqa: E402
from kforcing.data import heldout_contexts  # noqa: E402
from kforcing.evaluation.metrics import sample_quality  # noqa: E402
from kforcing.students.draft import evaluate as draft_eval  # noqa: E402
from kforcing.students.draft.student import Sampling  # noqa: E402
from kforcing.students.push_forward.evaluate import coupled_agreement, generate_samples  # noqa: E402
from kforcing.students.registry import kind_named  # noqa: E402
from kforcing.workflows.distill import DistillConfig, distill  # noqa: E402
from kforcing.workflows.evaluate import EvalConfig, Models, heldout_data  # noqa: E402
from kforcing.workflows.loading import load_model  # noqa: E402

TRUNCATED = dict(tau=(0.7, 0.7), top_k=50, top_p=0.9)
# `kforcing distill`'s defaults for a draft student: the chain pathway (one head block; a draft vocabulary of V/8 on
# teachers with V >= 8192, implied by the pathway).
DEFAULT = dict(pathway="chain", readout="categorical", windows="student", noise_code="sinusoid",
               cdf_order="vocab", **TRUNCATED)
TRUNK = dict(pathway="trunk")  # hint rows through the teacher's blocks (a full copy of them for a kforcing teacher)
# The drafting designs of docs/method.md §8 each have a row: default (the chain: a teacher pass plus a chain of k-1
# one-token head calls), head (a teacher pass plus one head call drafting the k-1 tokens jointly from their
# uniforms), trunk and trunk-lora-32 (a verify pass, then a second pass of hint rows through the teacher's blocks
# with a full copy of them or a rank-32 LoRA), onepass (hint sets for every accepted count inside the teacher's
# verify call, rank-32 LoRA). The other rows change one option of the pathway they name.
ROWS = {
    "default": {},
    "head": dict(pathway="head"),
    "head-1-layer": dict(pathway="head", head_layers=1),
    "trunk": TRUNK,
    "trunk-lora-8": dict(TRUNK, adapter_rank=8),
    "trunk-lora-32": dict(TRUNK, adapter_rank=32),
    "onepass": dict(pathway="onepass"),
    "chain-2-layers": dict(head_layers=2),
    "chain-draft-vocab-512": dict(draft_vocab=512),
    "onehot": dict(TRUNK, readout="onehot"),
    "teacher-windows": dict(TRUNK, windows="teacher"),
    "onehot-teacher-windows": dict(TRUNK, readout="onehot", windows="teacher"),
    "onehot-boundary": dict(TRUNK, readout="onehot", windows="teacher", boundary_beta=0.5),
    "dyadic": dict(TRUNK, noise_code="dyadic"),
    "binary": dict(TRUNK, noise_code="binary"),
    "descending": dict(cdf_order="descending"),
    "temperature-1": dict(tau=(1.0, 1.0), top_k=0, top_p=1.0),
    "paper": dict(paper=True),
}
# The calibration run logs its throughput every CALIBRATION_LOG_INTERVAL steps; the row's step time is the median
# over those intervals after the first (warm-up), so one interval slowed by other work on a shared machine does
# not set the row's budget.
CALIBRATION_STEPS = 30
CALIBRATION_LOG_INTERVAL = 5


def distill_config(args, row, out, steps, **extra):
    """The row's DistillConfig for `steps` optimizer steps in all (split evenly over a progressive row's stages)."""
    settings = row_settings(row)
    stages = 3 if settings.get("paper") else 1  # --paper is the progressive schedule 1, 2, 4
    per_stage = max(1, steps // stages)
    return DistillConfig(teacher=args.teacher, out_dir=str(out), steps=[per_stage], batch_size=args.batch_size,
                         seq_len=args.seq_len, warmup_steps=min(50, per_stage // 10), eval_interval=10 ** 6,
                         eval_batches=2, ar_eval_contexts=0, save_interval=10 ** 6, progress=False, device="cpu",
                         seed=args.seed, **settings, **extra)


def row_settings(row):
    """The row's DistillConfig settings: the default with the row's change (--paper alone: it fixes the rest)."""
    return dict(ROWS[row]) if ROWS[row].get("paper") else {**DEFAULT, **ROWS[row]}


def row_sampling(row):
    """The sampling distribution the row learns and is evaluated at (--paper: temperature 1, untruncated)."""
    paper = {**DEFAULT, "tau": (1.0, 1.0), "top_k": 0, "top_p": 1.0}
    settings = paper if ROWS[row].get("paper") else row_settings(row)
    return Sampling(settings["tau"][0], settings["top_k"], settings["top_p"], settings["cdf_order"])


def seconds_per_step(args, row, scratch):
    """Wall seconds per training step of `row`, from the throughput its own short run logs after warming up (the
    median over the logged intervals, averaged over the stages of a progressive row); the run is thrown away."""
    out = scratch / f"{row}-calibration"
    stages = 3 if ROWS[row].get("paper") else 1
    distill(distill_config(args, row, out, CALIBRATION_STEPS * stages, log_interval=CALIBRATION_LOG_INTERVAL))
    per_step = []
    for stage in sorted(out.glob("stage_k*")):
        logged = [r["windows_per_s"] for r in ckpt.RunLayout(stage).read_metrics() if "windows_per_s" in r]
        per_step.append(args.batch_size * args.seq_len / statistics.median(logged[1:] or logged))
    shutil.rmtree(out)
    return sum(per_step) / len(per_step)


def evaluate_row(args, row, student, models, prompts, reference, floor_contexts):
    """The table's measurements of one trained row (see the module docstring)."""
    sampling = row_sampling(row)
    common_args = dict(length=args.sample_len, seed=args.seed, sampling=sampling, batch_size=args.eval_batch)
    if ROWS[row].get("paper"):
        agreement = coupled_agreement(models.teacher, student, prompts, 4, seed=args.seed, temperature=1.0)
        samples = generate_samples(student, prompts, args.sample_len, seed=args.seed, k=4)
        result = {"agreement": agreement["per_offset"]}
    else:
        verified = draft_eval.verified_rows(student, prompts, [4], reference=reference[sampling], **common_args)[0]
        diagnostics = draft_eval.diagnostics(student, prompts, 4, floor_contexts=floor_contexts, **common_args)
        samples = draft_eval.draft_decoding(student, prompts, args.sample_len, 4, args.seed, sampling,
                                            args.eval_batch, verify=False)["samples"]
        speed = draft_eval.draft_speed(student, [4], args.speed_batches, prompts, args.sample_len,
                                       args.speed_repeats, args.seed, sampling, compile=args.compile)
        result = {"tokens_per_pass": verified["tokens_per_pass"], "accepted": verified["accepted"],
                  "equals_ar": verified["equals_ar"], "floor": diagnostics["floor"], "shuffle": diagnostics["shuffle"],
                  "speed": {f"{r['decoder']}, batch {r['batch']}": r["speedup"] for r in speed
                            if r["decoder"] != "AR"},
                  "ms_per_round": {f"{r['decoder']}, batch {r['batch']}": r["ms_per_pass"] for r in speed}}
    teacher_quality = sample_quality(reference[sampling], prompts, models.teacher)
    quality = sample_quality(samples, prompts, models.teacher)
    result.update(teacher_quality=teacher_quality, quality=quality)
    return result


SPEED_DECODERS = ("verified k=4", "verified adaptive", "unverified k=4")


def speed_cell(r, decoder, batches):
    """The row's tokens/s over AR's for `decoder` at each batch size, "1.21 / 0.74 / 0.70"."""
    speed = r.get("speed", {})
    return " / ".join(f"{speed[f'{decoder}, batch {b}']:.2f}" if f"{decoder}, batch {b}" in speed else "-"
                      for b in batches)


def table(rows, batches):
    batch_label = " / ".join(str(b) for b in batches)
    speed_headers = "".join(f" | {decoder} vs AR, batch {batch_label}" for decoder in SPEED_DECODERS)
    lines = [f"| row | changed | steps | train s | tokens/pass (verified){speed_headers} | accept 2 / 3 / 4 "
             "| u-blind floor 2 / 3 / 4 | u-shuffle 2 / 3 / 4 | PPL ratio | entropy gap | repeat ratio |",
             "|" + "---|" * (11 + len(SPEED_DECODERS))]
    for r in rows:
        q, t = r["quality"], r["teacher_quality"]
        changed = ", ".join(f"{k}={v}" for k, v in ROWS[r["row"]].items()) or "(the default)"
        if "tokens_per_pass" in r:
            tpp = f"{r['tokens_per_pass']:.3f}" + ("" if r["equals_ar"] else " (NOT EXACT)")
            accept = " / ".join(f"{a:.3f}" for a in r["accepted"])
            floor = " / ".join(f"{a:.3f}" for a in r["floor"])
            shuffle = " / ".join(f"{a:.3f}" for a in r["shuffle"]) if r["shuffle"] is not None else "-"
            speeds = "".join(f" | {speed_cell(r, decoder, batches)}" for decoder in SPEED_DECODERS)
        else:
            tpp = "cannot verify"
            accept = "agreement " + " / ".join(f"{a:.3f}" for a in r["agreement"][1:])
            floor = shuffle = "-"
            speeds = " | -" * len(SPEED_DECODERS)
        lines.append(f"| {r['row']} | {changed} | {r['steps']} | {r['train_seconds']:.0f} | {tpp}{speeds} | "
                     f"{accept} | {floor} | {shuffle} | {q['ppl_teacher'] / t['ppl_teacher']:.2f} | "
                     f"{abs(q['unigram_entropy'] - t['unigram_entropy']) / t['unigram_entropy']:.1%} | "
                     f"{q['longest_repeat_mean'] / max(t['longest_repeat_mean'], 1e-9):.2f} |")
    return "\n".join(lines)


def plot(rows, path):
    """<path>: per row, verified tokens per pass (none for the paper row: it cannot verify) and the unverified
    samples' perplexity ratio, beside the default's."""
    from kforcing.evaluation.report_tables import pyplot, save_figure

    plt = pyplot()
    names = [r["row"] for r in rows][::-1]
    by_name = {r["row"]: r for r in rows}
    tpp = [by_name[n].get("tokens_per_pass", 0.0) for n in names]
    ppl = [by_name[n]["quality"]["ppl_teacher"] / by_name[n]["teacher_quality"]["ppl_teacher"] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.35 * len(names) + 1.5), sharey=True)
    colours = ["tab:orange" if n == "default" else "tab:blue" for n in names]
    left.barh(names, tpp, color=colours)
    left.axvline(1.0, color="grey", lw=0.8)
    for y, name in enumerate(names):
        if "tokens_per_pass" not in by_name[name]:
            left.text(0.05, y, "cannot verify", va="center", fontsize=8)
    left.set_xlabel("verified tokens per pass, k = 4 (AR = 1)")
    right.barh(names, ppl, color=colours)
    right.axvline(1.0, color="grey", lw=0.8)
    right.set_xscale("log")
    right.set_xlabel("unverified samples' PPL / the teacher's samples' (1 = equal)")
    if "default" in by_name:
        left.axvline(tpp[names.index("default")], color="tab:orange", ls="--", lw=0.8)
        right.axvline(ppl[names.index("default")], color="tab:orange", ls="--", lw=0.8)
    return save_figure(fig, path)


def row_record(args, row, meta):
    """What a row's result depends on: an earlier result is reused only when all of it is the same."""
    measured = {key: value for key, value in vars(args).items() if key not in ("rows", "keep", "no_save", "name")}
    return json.loads(json.dumps({"args": measured, "row": row_settings(row), "git_sha": meta["git_sha"],
                                  "device": meta["device"], "torch": meta["torch"]}))


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the AR teacher run (e.g. the demo's runs/demo/teacher)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="which rows to run")
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget per row")
    parser.add_argument("--batch-size", type=int, default=16, help="contexts per training step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per context (each anchors a window)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts of the evaluation")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per held-out prompt")
    parser.add_argument("--sample-len", type=int, default=64, help="tokens decoded per prompt")
    parser.add_argument("--floor-windows", type=int, default=256, help="held-out windows of the u-blind floor")
    parser.add_argument("--eval-batch", type=int, default=32, help="prompts per decode call")
    parser.add_argument("--speed-repeats", type=int, default=5, help="interleaved timing repeats of AR against "
                        "each decoder (the speed columns are their median ratios)")
    parser.add_argument("--speed-batches", type=int, nargs="+", default=[1], help="batch sizes the speed columns "
                        "are timed at")
    parser.add_argument("--compile", action="store_true", help="time every decoder compiled (AR too), as `kforcing "
                        "eval --compile` does: what a CPU deployment runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of training noise, data order and evaluation")
    parser.add_argument("--name", default="ablation_draft", help="results folder name (bench/results/NAME_<device>)")
    parser.add_argument("--keep", default=None, help="keep the trained rows and their results in this directory "
                        "(default: a temporary one, deleted); run again with the same --keep, settings and git "
                        "revision, and the finished rows are reused, so a run of hours can be interrupted and resumed")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    meta = common.metadata(device)  # the revision that runs: a run lasts hours, and the checkout may move on
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kforcing-ablation-"))
    teacher, tokenizer, _ = load_model(args.teacher)
    models = Models(teacher, None, kind_named("draft"), tokenizer, None, ckpt.read_provenance(args.teacher), None)
    dataset = heldout_data(EvalConfig(teacher=args.teacher, student=args.teacher), models)
    prompts = heldout_contexts(dataset, args.prompts, args.prompt_len, args.prompt_len, seed=args.seed + 1)
    floor_contexts = heldout_contexts(dataset, args.floor_windows, args.seq_len, seed=args.seed + 2)
    reference = {}  # the teacher's AR samples per sampling setting: what verified decoding must equal
    rows = []
    for row in args.rows:
        saved = scratch / row / "result.json"
        if args.keep and saved.is_file():
            previous = json.loads(saved.read_text())
            if previous["settings"] == row_record(args, row, meta):
                print(f"[{row}] reusing the result of an earlier run of these settings: {saved}", flush=True)
                rows.append(previous["result"])
                continue
        sampling = row_sampling(row)
        if sampling not in reference:
            reference[sampling] = draft_eval.ar_samples(teacher, prompts, args.sample_len, args.seed, sampling,
                                                        args.eval_batch)
        per_step = seconds_per_step(args, row, scratch)
        steps = max(CALIBRATION_STEPS, int(60 * args.minutes / per_step))
        print(f"[{row}] {per_step:.3f} s/step -> {steps} steps in {args.minutes:g} min", flush=True)
        out = scratch / row
        shutil.rmtree(out, ignore_errors=True)  # a row an interrupted run left unfinished starts over
        start = time.perf_counter()
        distill(distill_config(args, row, out, steps))
        train_seconds = time.perf_counter() - start
        student, _, _ = load_model(out)
        result = {"row": row, "steps": steps, "seconds_per_step": per_step, "train_seconds": train_seconds,
                  **evaluate_row(args, row, student, models, prompts, reference, floor_contexts)}
        rows.append(result)
        if args.keep:  # an interrupted run resumes from its finished rows (see --keep)
            saved.write_text(json.dumps({"settings": row_record(args, row, meta), "result": result}, indent=2))
        print(table([result], args.speed_batches).splitlines()[-1], flush=True)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    text = (f"Teacher `{args.teacher}`; each row trains for {args.minutes:g} min of wall clock on this machine "
            f"({torch.get_num_threads()} threads), contexts {args.batch_size} x {args.seq_len}; evaluation on "
            f"{args.prompts} held-out {args.prompt_len}-token prompts x {args.sample_len} tokens, k = 4, the same "
            f"seeds for every row; the u-blind floor on {args.floor_windows} held-out windows. Default: "
            + ", ".join(f"{k}={v}" for k, v in DEFAULT.items()) + ". Ratios are the unverified samples' over the "
            "teacher's own samples at the row's sampling settings.\n\n"
            + table(rows, args.speed_batches))
    print(text)
    if not args.no_save:
        config = {key: value for key, value in vars(args).items()}
        json_path, md_path, _ = common.save(args.name, device, rows, text, extra={"settings": config,
                                                                                         "default": DEFAULT}, meta=meta)
        print(f"wrote {json_path} and {md_path}")
        try:
            print(f"wrote {plot(rows, json_path.with_suffix('.png'))}")
        except ImportError:
            print("no plot: matplotlib is not installed")


if __name__ == "__main__":
    main()
