"""The `kforcing` command line.

    kforcing train-teacher --config tiny --corpus stdlib --out runs/teacher
    kforcing sample --ckpt runs/teacher --prompt "def main(" --max-new-tokens 64
    kforcing sample --ckpt runs/student --prompt "def main(" --k 4
    kforcing distill --teacher runs/teacher --schedule 1,2,4 --out runs/student
    kforcing eval --teacher runs/teacher --student runs/student --k 1,2,4
    kforcing demo [--quick | --full]

Run `kforcing <command> --help` for every option. Errors in the input (a missing corpus, a bad checkpoint, a
prompt that is too long, ...) print one line `kforcing: error: ...` and exit with status 2; set KFORCING_DEBUG=1
for the traceback.
"""

import argparse
import os
import sys
import time



# ---------------------------------------------------------------------------------------------------------
# Options that train-teacher and distill share (the same names, and the same fields of their configs)


def _add_optimisation_options(g, lr_help, warmup, warmup_help, weight_decay):
    g.add_argument("--batch-size", type=int, default=16, help="sequences per step per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per step")
    g.add_argument("--lr", type=float, default=None, help=lr_help)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (cosine)")
    g.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    g.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")


def _add_device_options(g, dtype_help, compile_help="torch.compile the model"):
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=dtype_help)
    g.add_argument("--compile", action="store_true", help=compile_help)


def _add_logging_options(g, save_interval, keep_help, tensorboard_help, progress_help):
    g.add_argument("--save-interval", type=int, default=save_interval, help="steps between checkpoints")
    g.add_argument("--log-interval", type=int, default=10, help="steps between metrics lines")
    g.add_argument("--keep-checkpoints", type=int, default=2, help=keep_help)
    g.add_argument("--tensorboard", action="store_true", help=tensorboard_help)
    g.add_argument("--no-progress", action="store_true", help=progress_help)


def _shared_config_fields(args) -> dict:
    """The TrainConfig / DistillConfig fields that both commands take from the same options."""
    max_bytes = None if args.corpus_max_mb is None else int(args.corpus_max_mb * 1e6)
    return dict(
        text_field=args.text_field, corpus_max_bytes=max_bytes, data_dir=args.data_dir,
        val_fraction=args.val_fraction, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_interval=args.eval_interval,
        eval_batches=args.eval_batches, save_interval=args.save_interval, log_interval=args.log_interval,
        keep_checkpoints=args.keep_checkpoints, seed=args.seed, device=args.device, dtype=args.dtype,
        compile=args.compile, resume=args.resume, stop_after=args.stop_after, tensorboard=args.tensorboard,
        progress=not args.no_progress)


def _add_train_parser(subparsers):
    from .model import PRESETS

    p = subparsers.add_parser(
        "train-teacher", help="train an AR teacher on a corpus",
        description="Train an AR teacher (kforcing.model.ARModel). Checkpoints (safetensors + config + tokenizer + "
                    "optimizer) go to OUT/checkpoints, metrics to OUT/metrics.jsonl. Under torchrun it trains with "
                    "DDP. The field's conventions: LM1B = --corpus hf:lm1b --tokenizer bert-base-uncased "
                    "--seq-len 128; OpenWebText = --corpus hf:openwebtext --tokenizer gpt2 --seq-len 1024 "
                    "--config base --lr 3e-4 --warmup 2500 (both need the `datasets` package and the hub).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="model preset")
    g.add_argument("--corpus", action="append", default=None,
                   help="'stdlib' (the running Python's stdlib sources + pydoc topics), a text file, a directory, a "
                        "glob, a .jsonl file, or hf:NAME[:CONFIG][@SPLIT]; repeat to combine (default: stdlib)")
    g.add_argument("--text-field", default="text", help="the text field of JSONL records / dataset rows")
    g.add_argument("--corpus-max-mb", type=float, default=None, help="read at most this many MB of the corpus")
    g.add_argument("--tokenizer", default=None,
                   help="a tokenizer.json path or hub name; default: train a byte-level BPE on the corpus")
    g.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: the preset's)")
    g.add_argument("--data-dir", default=None, help="token cache directory (default: OUT/data)")
    g.add_argument("--rebuild-data", action="store_true", help="re-tokenise even if a token cache exists")
    g.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    g.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: max_seq_len)")
    g.add_argument("--dropout", type=float, default=None, help="residual dropout (default: the preset's, 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    _add_optimisation_options(g, lr_help="peak learning rate (default: tiny 2e-3, small 6e-4, base 3e-4)",
                              warmup=100, warmup_help="linear warmup steps", weight_decay=0.1)
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    _add_device_options(g, dtype_help="autocast dtype; auto = bfloat16 on GPU, float32 on CPU")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps, keeping the --steps schedule")
    g.add_argument("--eval-interval", type=int, default=200, help="steps between validation losses")
    g.add_argument("--eval-batches", type=int, default=20, help="batches per validation loss")
    _add_logging_options(g, save_interval=1000, keep_help="checkpoints kept on disk",
                         tensorboard_help="also write TensorBoard events to OUT/tensorboard",
                         progress_help="hide the progress bar")
    p.set_defaults(func=_train_teacher)


def _train_teacher(args):
    from .train import TrainConfig, train_teacher

    config = TrainConfig(
        out_dir=args.out, preset=args.config, corpus=args.corpus or ["stdlib"], tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, rebuild_data=args.rebuild_data, steps=args.steps, dropout=args.dropout,
        **_shared_config_fields(args))
    summary = train_teacher(config)
    if summary.get("checkpoint"):
        val = summary["val_loss"]
        print(f"step {summary['step']}: train loss {summary['train_loss']:.4f}, "
              f"val loss {val:.4f}" if val is not None else f"step {summary['step']}", file=sys.stderr)
        print(f"checkpoint: {summary['checkpoint']}", file=sys.stderr)
    return 0


def _add_sample_parser(subparsers):
    p = subparsers.add_parser(
        "sample", help="print samples from a teacher or a K-Forcing student checkpoint",
        description="Sample from a checkpoint. A teacher (AR) decodes one token per pass by inverse-CDF sampling; "
                    "a push-forward student decodes --k tokens per pass. Both draw the uniform of position p of "
                    "sample j from (--seed, j, p), so a teacher and a student given the same seed are coupled.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint directory or a run directory (uses its latest)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text; repeat for several (default: EOS)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sample")
    p.add_argument("--k", type=int, default=None, help="tokens per pass (students only; default: the student's max_k)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (student: its tau)")
    p.add_argument("--top-k", type=int, default=0, help="AR only: keep the top-k tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="AR only: nucleus mass (1: all)")
    p.add_argument("--freq-penalty", type=float, default=0.0, help="student only: frequency penalty lambda")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_sample)


def _sample(args):
    import torch

    from .checkpoint import load_model
    from .generate import generate_ar, generate_kforcing
    from .model import PushForwardLM

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    model, tokenizer, _ = load_model(args.ckpt, device=args.device)
    if tokenizer is None:
        raise ValueError(f"checkpoint {args.ckpt} has no tokenizer.json, so text prompts cannot be encoded")
    is_student = isinstance(model, PushForwardLM)
    if args.k is not None and not is_student:
        raise ValueError("--k needs a K-Forcing student checkpoint; this one is an AR teacher (omit --k)")
    if is_student and (args.top_k or args.top_p < 1.0):
        raise ValueError("--top-k/--top-p apply to AR teachers only; a student decodes by argmax")
    if not is_student and args.freq_penalty:
        raise ValueError("--freq-penalty applies to K-Forcing students only")
    texts = args.prompt or [""]
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text) if text else []
        prompts.extend([[tokenizer.eos_id] + ids] * args.num_samples)  # EOS = document start
    eos = None if args.no_stop else tokenizer.eos_id
    start = time.perf_counter()
    if is_student:
        out = generate_kforcing(model, prompts, args.max_new_tokens, k=args.k, seed=args.seed,
                                temperature=args.temperature, freq_penalty=args.freq_penalty, eos_id=eos,
                                pad_id=tokenizer.pad_id)
    else:
        out = generate_ar(model, prompts, args.max_new_tokens, seed=args.seed, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, eos_id=eos, pad_id=tokenizer.pad_id)
    elapsed = time.perf_counter() - start
    for i, tokens in enumerate(out.tolist()):
        text, j = texts[i // args.num_samples], i % args.num_samples
        if tokens and eos is not None and tokens[-1] == eos:
            tokens = tokens[:-1]
        print(f"=== sample {i // args.num_samples}.{j}")
        print(text + tokenizer.decode(tokens))
    generated = int(out.lengths.sum())
    kind = f"K-Forcing k={args.k or model.max_k}" if is_student else "AR"
    print(f"[{kind}: {generated} tokens in {out.num_passes} passes, {elapsed:.2f} s, "
          f"{generated / max(elapsed, 1e-9):.1f} tokens/s, {torch.get_num_threads()} CPU threads]", file=sys.stderr)
    return 0


def _add_distill_parser(subparsers):
    p = subparsers.add_parser(
        "distill", help="distil an AR teacher into a K-Forcing student, progressively (k = 1 -> 2 -> 4)",
        description="Progressive self-forcing distillation (METHOD.md section 5). Stage k=1 learns the teacher's "
                    "float64 inverse-CDF tokens at temperature tau; stage k -> 2k learns two consecutive decode steps "
                    "of the frozen stage-k student. Each stage writes OUT/stage_kK (metrics.jsonl, checkpoints, "
                    "final/), and OUT/latest.json points to the newest finished student. Under torchrun it trains "
                    "with DDP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("teacher, stages and data")
    g.add_argument("--teacher", required=True, help="the AR teacher: a checkpoint or a train-teacher run directory")
    g.add_argument("--out", required=True, help="run directory of the students")
    g.add_argument("--schedule", default="1,2,4", help="the stages' k, doubling from 1 (e.g. 1,2,4 or 1,2,4,8)")
    g.add_argument("--objective", default="self-forcing", choices=["self-forcing", "noise-inversion"],
                   help="self-forcing (the teacher's own tokens) or the noise-inversion baseline (data tokens, u "
                        "drawn inside their teacher-CDF interval)")
    g.add_argument("--steps", default="1000", help="optimizer steps per stage: one value, or one per stage (500,500,"
                                                   "1000)")
    g.add_argument("--plateau-patience", type=int, default=None,
                   help="also end a stage once this many evaluations in a row gain less than --plateau-delta in "
                        "validation exact match (default: off)")
    g.add_argument("--plateau-delta", type=float, default=0.005, help="the gain that counts as progress")
    g.add_argument("--min-steps", type=int, default=0, help="no plateau stop before this many steps of a stage")
    g.add_argument("--tau", default="1.0", help="the temperature the student learns: T, or MIN:MAX to draw one per "
                                                "sequence uniformly (e.g. 0.7:1.2)")
    g.add_argument("--corpus", action="append", default=None,
                   help="contexts from this corpus (as in train-teacher); default: the teacher's own token cache")
    g.add_argument("--text-field", default="text", help="the text field of JSONL records / dataset rows")
    g.add_argument("--corpus-max-mb", type=float, default=None, help="read at most this many MB of --corpus")
    g.add_argument("--data-dir", default=None, help="token cache directory for --corpus (default: OUT/data)")
    g.add_argument("--val-fraction", type=float, default=0.01, help="held-out share of documents for --corpus")
    g.add_argument("--seq-len", type=int, default=None,
                   help="context tokens per sequence, each the anchor of a window (default: the teacher's training "
                        "length, at most max_seq_len - max k)")
    g = p.add_argument_group("optimisation")
    _add_optimisation_options(g, lr_help="peak learning rate (default: 1e-3 up to width 256, 3e-4 above)",
                              warmup=50, warmup_help="linear warmup steps per stage", weight_decay=0.0)
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the exported weights")
    g.add_argument("--noise-lr-scale", type=float, default=1.0,
                   help="learning-rate multiplier of the noise encoder (the only new weights of stage 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise, the temperatures and the data order")
    _add_device_options(g, dtype_help="autocast dtype of the student; auto = bfloat16 on GPU, float32 on CPU "
                                      "(targets: float32 teacher passes, float64 CDF)",
                        compile_help="torch.compile the student's training forward")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in OUT: finished stages are kept, an interrupted one continues exactly")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps in total over all stages")
    g.add_argument("--eval-interval", type=int, default=200, help="steps between validation metrics")
    g.add_argument("--eval-batches", type=int, default=8, help="batches per validation")
    g.add_argument("--ar-eval-contexts", type=int, default=128,
                   help="held-out contexts for the coupled agreement with the AR teacher at the start and end of "
                        "each stage (0: off)")
    _add_logging_options(g, save_interval=500, keep_help="training checkpoints kept per stage",
                         tensorboard_help="also write TensorBoard events per stage",
                         progress_help="hide the progress bars")
    p.set_defaults(func=_distill)


def _distill(args):
    from .distill import DistillConfig, distill, parse_int_list, parse_tau

    config = DistillConfig(
        teacher=args.teacher, out_dir=args.out, schedule=parse_int_list(args.schedule, "--schedule"),
        objective=args.objective, steps=parse_int_list(args.steps, "--steps"), tau=parse_tau(args.tau),
        ema_decay=args.ema_decay, noise_lr_scale=args.noise_lr_scale, plateau_patience=args.plateau_patience,
        plateau_delta=args.plateau_delta, min_steps=args.min_steps, corpus=args.corpus,
        ar_eval_contexts=args.ar_eval_contexts, **_shared_config_fields(args))
    summary = distill(config)
    if int(os.environ.get("RANK", "0")) == 0:
        for stage in summary["stages"]:
            agree = [stage.get(f"ar_agree_{j}") for j in range(1, stage["k"] + 1)]
            agree = ", ".join("-" if a is None else f"{a:.3f}" for a in agree)
            print(f"stage k={stage['k']}: {stage['step']} steps, val exact match {stage['val_exact_match']:.3f}, "
                  f"AR agreement per offset [{agree}]", file=sys.stderr)
        if summary["checkpoint"]:
            print(f"student: {summary['checkpoint']}", file=sys.stderr)
        else:
            print(f"stopped before the last stage finished; continue with --resume --out {args.out}",
                  file=sys.stderr)
    return 0


def _add_eval_parser(subparsers):
    p = subparsers.add_parser(
        "eval", help="coupled agreement, sample quality and decode speed of a student vs its teacher",
        description="Evaluate a K-Forcing student against its AR teacher (METHOD.md section 6): coupled agreement "
                    "on held-out contexts with shared uniforms, sample quality (perplexity under the teacher and "
                    "an optional reference, unigram entropy, distinct-2/3, longest repeated n-gram) with and without "
                    "the frequency penalty, and decode tokens/s of AR vs the student at each k. Writes eval.json, "
                    "eval.md and PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="the AR teacher (checkpoint or run directory)")
    p.add_argument("--student", required=True, help="the student (checkpoint, or a distill run directory)")
    p.add_argument("--k", default=None, help="k values to evaluate, e.g. 1,2,4 (default: 1, 2, 4, .. max_k)")
    p.add_argument("--reference", default=None,
                   help="an optional larger AR checkpoint to score samples with (another tokenizer is fine: samples "
                        "are re-tokenised)")
    p.add_argument("--out", default=None, help="output directory (default: STUDENT/eval)")
    p.add_argument("--contexts", type=int, default=256, help="held-out contexts for the coupled agreement")
    p.add_argument("--context-len", type=int, default=None, help="longest context (default: max_seq_len - max k)")
    p.add_argument("--num-samples", type=int, default=32, help="samples per model and k")
    p.add_argument("--sample-len", type=int, default=128, help="tokens per sample")
    p.add_argument("--prompt-len", type=int, default=0,
                   help="0: unconditional samples (EOS prompt); N: held-out prefixes of N tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the student's tau)")
    p.add_argument("--freq-penalty", type=float, default=1.0, help="lambda of the penalised student samples (0: none)")
    p.add_argument("--batch-sizes", default="1,8,32", help="batch sizes of the decode benchmark ('' to skip it)")
    p.add_argument("--speed-tokens", type=int, default=64, help="new tokens per benchmark call")
    p.add_argument("--speed-repeats", type=int, default=3, help="interleaved benchmark rounds")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call for agreement/samples")
    p.add_argument("--data-dir", default=None, help="token cache with a validation split (default: found next to "
                                                    "the student or teacher)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_eval)


def _eval(args):
    from pathlib import Path

    from .distill import parse_int_list
    from .evaluate import EvalConfig, markdown_tables, run_eval

    out = args.out
    if out is None:
        student = Path(args.student).expanduser()
        out = str(student / "eval" if student.is_dir() and (student / "latest.json").is_file()
                  else student.parent / "eval")
    batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes.strip() else []
    config = EvalConfig(
        teacher=args.teacher, student=args.student, out_dir=out,
        ks=parse_int_list(args.k, "--k") if args.k else None, reference=args.reference, contexts=args.contexts,
        context_len=args.context_len, num_samples=args.num_samples, sample_len=args.sample_len,
        prompt_len=args.prompt_len, temperature=args.temperature, freq_penalty=args.freq_penalty,
        batch_sizes=batch_sizes, speed_tokens=args.speed_tokens, speed_repeats=args.speed_repeats,
        batch_size=args.batch_size, data_dir=args.data_dir, seed=args.seed, device=args.device,
        threads=args.threads, plots=not args.no_plots, progress=not args.no_progress)
    results = run_eval(config)
    print(markdown_tables(results))
    print(f"results: {out}/eval.json, {out}/eval.md", file=sys.stderr)
    return 0


def _add_demo_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help="the whole method end to end: corpus -> teacher -> distil 1->2->4 -> eval -> report",
        description="Build the default corpus (the Python stdlib), train a tiny AR teacher, distil it into K-Forcing "
                    "students k = 1 -> 2 -> 4, evaluate them (coupled agreement, sample quality, decode speed), print "
                    "a summary table and write a report folder (Markdown + plots + checkpoints). About 10 minutes "
                    "on a CPU by default, 2 with --quick; --full is a real run for a GPU. Re-running resumes: "
                    "finished phases and stages are kept.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 2 minutes on a CPU (a smoke run)")
    size.add_argument("--full", action="store_true", help="the small preset, trained for real (a GPU)")
    p.add_argument("--out", default=None, help="report folder (default: runs/demo, runs/demo-quick, runs/demo-full)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_demo)


def _demo(args):
    from .demo import run_demo

    profile = "quick" if args.quick else "full" if args.full else "default"
    result = run_demo(profile, out_dir=args.out, device=args.device, threads=args.threads,
                      progress=not args.no_progress)
    print(result["summary"])
    print(f"report: {result['report']}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kforcing", description="K-Forcing: train an AR teacher, distil it into a student that samples k tokens "
                                     "per forward pass, evaluate it, or run it all with `kforcing demo`.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_train_parser(subparsers)
    _add_sample_parser(subparsers)
    _add_distill_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_demo_parser(subparsers)
    return parser


def main(argv=None):
    """Entry point of the `kforcing` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import CorpusError, DataCacheError, TokenizerError

    try:
        return args.func(args)
    except (ValueError, CorpusError, DataCacheError, TokenizerError, CheckpointError) as error:
        if os.environ.get("KFORCING_DEBUG"):
            raise
        parser.exit(2, f"kforcing: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "kforcing: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
