"""The `kforcing` command line.

    kforcing train-teacher --config tiny --corpus stdlib --out runs/teacher
    kforcing sample --ckpt runs/teacher --prompt "def main(" --max-new-tokens 64
    kforcing sample --ckpt runs/student --prompt "def main(" --k 4
    kforcing distill --teacher runs/teacher --schedule 1,2,4 --out runs/student
    kforcing distill --teacher hf:path/to/model --corpus stdlib --out runs/hf-draft
    kforcing eval --teacher runs/teacher --student runs/student --k 1,2,4
    kforcing demo [--quick | --full]
    kforcing export-vllm --student runs/hf-draft --out runs/hf-draft/vllm
    kforcing serve --teacher path/to/model --drafter runs/hf-draft/vllm      (in vLLM's environment)

Run `kforcing <command> --help` for every option. Errors in the input (a missing corpus, a bad checkpoint, a
prompt that is too long, ...) print one line `kforcing: error: ...` and exit with status 2; set KFORCING_DEBUG=1
for the traceback.

The flags of train-teacher, distill and eval are built from the fields of their config dataclasses
(`kforcing.options.option`): each field's default and help text are written once, there.
"""

import argparse
import dataclasses
import os
import sys
import time
import typing
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------
# Flags from config fields


def _flag_type(annotation):
    """The argparse type of a field annotation: Optional[X] -> X; int, float, str as they are."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (int, float, str) else None


def add_options(group, config_class, names):
    """One flag per config field named in `names`, with the field's default, help and argparse settings."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for name in names:
        field = fields[name]
        meta = field.metadata
        kwargs = {"dest": name, "help": meta["help"], **meta["cli"]}
        if field.type is bool and "action" not in kwargs:
            kwargs["action"] = "store_true"
        if "action" not in kwargs and "type" not in kwargs and _flag_type(field.type):
            kwargs["type"] = _flag_type(field.type)
        if kwargs.get("action") == "store_false":  # --no-X: shown without a default; absent means the field's
            kwargs["default"] = argparse.SUPPRESS
        elif "default" not in kwargs and "action" not in kwargs and not kwargs.get("required"):
            kwargs["default"] = field.default
        flag = meta["flag"] or "--" + name.replace("_", "-")
        if meta["flag"] and kwargs.get("action") not in ("store_true", "store_false") and "choices" not in kwargs:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()  # the flag's name, not the field's
        group.add_argument(flag, **kwargs)


def config_from_args(config_class, args):
    """The config whose fields have flags in `args` (each through its field's `convert`)."""
    values = {}
    for field in dataclasses.fields(config_class):
        if hasattr(args, field.name):
            convert = field.metadata.get("convert")
            value = getattr(args, field.name)
            values[field.name] = convert(value) if convert else value
    return config_class(**values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a flag's default to its help, unless the help already says it, there is none to show, or the flag
    is a switch (its default is always "off"). The benchmarks' --help uses it too."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _new_parser(subparsers, name, help, description):
    # allow_abbrev=False: a prefix is never taken for an option (distill --k 2 is not --keep-checkpoints 2)
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter,
                                 allow_abbrev=False)


# ---------------------------------------------------------------------------------------------------------
# train-teacher


def _add_train_parser(subparsers):
    from ..training.train import TrainConfig

    p = _new_parser(
        subparsers, "train-teacher", "train an AR teacher on a corpus",
        "Train an AR teacher (kforcing.models.transformer.ARModel). Checkpoints (safetensors + config + tokenizer + "
        "optimizer) go to OUT/checkpoints, metrics to OUT/metrics.jsonl. Under torchrun it trains with DDP. The "
        "field's conventions: LM1B = --corpus hf:lm1b --tokenizer bert-base-uncased --seq-len 128; OpenWebText = --corpus "
        "hf:openwebtext --tokenizer gpt2 --seq-len 1024 --config base --lr 3e-4 --warmup 2500 (both need the "
        "`datasets` package and the hub).")
    add_options(p.add_argument_group("model and data"), TrainConfig, [
        "preset", "corpus", "text_field", "corpus_max_bytes", "tokenizer", "vocab_size", "data_dir", "rebuild_data",
        "val_fraction", "seq_len", "dropout"])
    add_options(p.add_argument_group("optimisation"), TrainConfig, [
        "steps", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip",
        "seed", "device", "dtype", "compile"])
    add_options(p.add_argument_group("logging and checkpoints"), TrainConfig, [
        "out_dir", "resume", "stop_after", "eval_interval", "eval_batches", "save_interval", "log_interval",
        "keep_checkpoints", "tensorboard", "progress"])
    p.set_defaults(func=_train_teacher)


def _train_teacher(args):
    from ..training.train import TrainConfig, train_teacher

    summary = train_teacher(config_from_args(TrainConfig, args))
    if summary.get("checkpoint"):
        val = summary["val_loss"]
        print(f"step {summary['step']}: train loss {summary['train_loss']:.4f}, "
              f"val loss {val:.4f}" if val is not None else f"step {summary['step']}", file=sys.stderr)
        print(f"checkpoint: {summary['checkpoint']}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------
# sample


def _add_sample_parser(subparsers):
    p = _new_parser(
        subparsers, "sample", "print samples from a teacher or a K-Forcing student checkpoint",
        "Sample from a checkpoint. A teacher (AR) decodes one token per pass by inverse-CDF sampling; a push-forward "
        "student decodes --k tokens per pass. A draft student (distill --pathway chain, head, trunk or onepass) "
        "decodes with its teacher: with --verify its output is exactly the teacher's AR sample, several tokens per "
        "pass; without, it keeps its drafts (--k tokens per pass). All draw the uniform of position p of sample j "
        "from (--seed, j, p), so models given the same seed are coupled.")
    p.add_argument("--ckpt", required=True, help="a checkpoint directory or a run directory (uses its latest), or "
                   "hf:PATH: a Hugging Face causal LM (a save_pretrained folder with its tokenizer.json)")
    p.add_argument("--verify", action="store_true", help="draft students: lossless verified decoding")
    p.add_argument("--teacher", default=None, help="draft students: the teacher checkpoint or hf:PATH (default: "
                   "the one it was trained on, from its provenance)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text; repeat for several (default: EOS)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sample")
    p.add_argument("--k", type=int, default=None, help="tokens per pass (students only; default: the student's max_k; "
                   "with --verify, adaptive drafting: up to max_k a round, or a plain AR step when drafts do not pay)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (push-forward student: "
                   "its tau; default: a draft student's own, else 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="AR and draft students: keep the top-k tokens (0: all; "
                   "default: a draft student's own, else all)")
    p.add_argument("--top-p", type=float, default=None, help="AR and draft students: nucleus mass (1: all; default: "
                   "a draft student's own, else all)")
    p.add_argument("--cdf-order", default=None, choices=["vocab", "descending"], help="AR and draft students: the "
                   "inverse CDF's token order (default: a draft student's own, else vocab)")
    p.add_argument("--freq-penalty", type=float, default=0.0, help="student only: frequency penalty lambda")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="how the linear layers' weights are stored for decoding: bfloat16 reads half the bytes per "
                        "step (activations and the KV cache stay float32); the model decoded is then the "
                        "bf16-weight model, and --verify equals its AR samples")
    p.add_argument("--draft-weights", default="bfloat16", choices=["float32", "bfloat16"],
                   help="draft students with --dtype float32: how the head's linear weights are stored for drafting "
                        "(chain and head pathways). bfloat16 halves the bytes drafting reads; drafts only propose, "
                        "so --verify output is unchanged")
    p.set_defaults(func=_sample)


def _check_sample_args(args, kind):
    """Check the flags fit the model: an AR teacher (kind None) or a student of `kind`, whose own decoding refuses
    the settings it does not have."""
    if kind is None:
        if args.k is not None:
            raise ValueError("--k needs a K-Forcing student checkpoint; this one is an AR teacher (omit --k)")
        if args.freq_penalty:
            raise ValueError("--freq-penalty applies to push-forward K-Forcing students only")
        if args.verify:
            raise ValueError("--verify needs a draft student (distill --pathway chain, head, trunk or onepass): only "
                             "its token rows are the teacher's own")
    if args.teacher is not None and not (kind is not None and kind.decodes_with_teacher):
        raise ValueError("--teacher applies to draft students only")


def _fill_sampling(args, kind, config):
    """Unset sampling flags: what the student was distilled for (its kind reads its provenance), else the
    defaults of AR sampling."""
    from ..checkpoints.checkpoint import Provenance

    if kind is not None:
        chosen = kind.trained_sampling(Provenance.from_config(config))
    else:
        chosen = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "order": "vocab"}
    for flag, field in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                        ("cdf_order", "order")):
        if getattr(args, flag) is None:
            setattr(args, flag, chosen[field])


def _sample(args):
    import torch

    from ..decoding.generate import generate_ar
    from ..models.transformer import cast_linear_weights
    from ..runtime import resolve_device
    from ..students.registry import kind_of
    from ..workflows.loading import load_model

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    model, tokenizer, config = load_model(args.ckpt, device=resolve_device(args.device), teacher=args.teacher)
    if tokenizer is None:
        raise ValueError(f"checkpoint {args.ckpt} has no tokenizer.json, so text prompts cannot be encoded")
    kind = kind_of(model)
    _check_sample_args(args, kind)
    if kind is not None:
        kind.store_weights(model, getattr(torch, args.dtype), getattr(torch, args.draft_weights))
    elif args.dtype == "bfloat16":
        cast_linear_weights(model, torch.bfloat16)
    _fill_sampling(args, kind, config)
    texts = args.prompt or [""]
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text) if text else []
        prompts.extend([[tokenizer.eos_id] + ids] * args.num_samples)  # EOS = document start
    eos = None if args.no_stop else tokenizer.eos_id
    start = time.perf_counter()
    if kind is not None:
        out = kind.generate(model, prompts, args.max_new_tokens, k=args.k, seed=args.seed,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, order=args.cdf_order,
                            verify=args.verify, freq_penalty=args.freq_penalty, eos_id=eos, pad_id=tokenizer.pad_id)
    else:
        out = generate_ar(model, prompts, args.max_new_tokens, seed=args.seed, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, eos_id=eos, pad_id=tokenizer.pad_id,
                          order=args.cdf_order)
    elapsed = time.perf_counter() - start
    for i, tokens in enumerate(out.tolist()):
        text, j = texts[i // args.num_samples], i % args.num_samples
        if tokens and eos is not None and tokens[-1] == eos:
            tokens = tokens[:-1]
        print(f"=== sample {i // args.num_samples}.{j}")
        print(text + tokenizer.decode(tokens))
    generated = int(out.lengths.sum())
    if kind is None:
        mode = "AR"
    elif args.verify and args.k is None:
        mode = f"verified K-Forcing, adaptive up to k={model.max_k} ({out.ar_rounds} rounds were AR steps)"
    else:
        mode = ("verified " if args.verify else "") + f"K-Forcing k={args.k or model.max_k}"
    print(f"[{mode}: {generated} tokens in {out.num_passes} passes, {elapsed:.2f} s, "
          f"{generated / max(elapsed, 1e-9):.1f} tokens/s, {torch.get_num_threads()} CPU threads]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------
# distill


def _add_distill_parser(subparsers):
    from ..workflows.distill import DistillConfig

    p = _new_parser(
        subparsers, "distill", "distil an AR teacher into a k-token student (by default a draft student that "
        "decodes losslessly with --verify)",
        "By default (--pathway chain) the teacher stays frozen and only a one-block draft head trains (docs/method.md "
        "§8): the student's token rows are the teacher's own, and `kforcing sample --verify` decodes losslessly, "
        "several tokens per pass; the defaults are the ones bench/results/ablation_draft_cpu measured best. --paper "
        "(or --pathway full) runs the original method instead: progressive self-forcing (docs/method.md §5), where "
        "stage k=1 learns the teacher's float64 inverse-CDF tokens at temperature tau and stage k -> 2k learns two "
        "consecutive decode steps of the frozen stage-k student; under torchrun it trains with DDP. Each stage writes "
        "OUT/stage_kK (metrics.jsonl, checkpoints, final/), and OUT/latest.json points to the newest finished "
        "student.")
    add_options(p.add_argument_group("the student"), DistillConfig, [
        "paper", "pathway", "readout", "head_layers", "adapter_rank", "draft_vocab", "noise_code", "windows",
        "boundary_beta", "top_k", "top_p", "cdf_order"])
    add_options(p.add_argument_group("teacher, stages and data"), DistillConfig, [
        "teacher", "out_dir", "schedule", "objective", "steps", "plateau_patience", "plateau_delta", "min_steps",
        "tau", "corpus", "text_field", "corpus_max_bytes", "data_dir", "val_fraction", "seq_len"])
    add_options(p.add_argument_group("optimisation"), DistillConfig, [
        "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "ema_decay",
        "noise_lr_scale", "seed", "device", "dtype", "compile"])
    add_options(p.add_argument_group("logging and checkpoints"), DistillConfig, [
        "resume", "stop_after", "eval_interval", "eval_batches", "ar_eval_contexts", "save_interval", "log_interval",
        "keep_checkpoints", "tensorboard", "progress"])
    p.set_defaults(func=_distill)


def _distill(args):
    from ..workflows.distill import DistillConfig, distill

    config = config_from_args(DistillConfig, args)
    summary = distill(config)

    def number(stage, key, form="{:.3f}"):  # "-" for a metric the run did not measure (e.g. resumed when done)
        return "-" if stage.get(key) is None else form.format(stage[key])

    if int(os.environ.get("RANK", "0")) == 0:
        for stage in summary["stages"]:
            if config.pathway != "full":  # a draft student
                accept = ", ".join(number(stage, f"val_accept_{j}") for j in range(2, stage["k"] + 1))
                print(f"stage k={stage['k']}: {stage['step']} steps, acceptance per draft offset [{accept}], "
                      f"verified tokens per pass {number(stage, 'verified_tokens_per_pass', '{:.2f}')}",
                      file=sys.stderr)
                continue
            agree = ", ".join(number(stage, f"ar_agree_{j}") for j in range(1, stage["k"] + 1))
            print(f"stage k={stage['k']}: {stage['step']} steps, val exact match "
                  f"{number(stage, 'val_exact_match')}, AR agreement per offset [{agree}]", file=sys.stderr)
        if summary["checkpoint"]:
            print(f"student: {summary['checkpoint']}", file=sys.stderr)
        else:
            print(f"stopped before the last stage finished; continue with --resume --out {args.out_dir}",
                  file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------
# eval


def _add_eval_parser(subparsers):
    from ..workflows.evaluate import EvalConfig

    p = _new_parser(
        subparsers, "eval", "coupled agreement, sample quality and decode speed of a student vs its teacher",
        "Evaluate a K-Forcing student against its AR teacher (docs/method.md §6): coupled agreement on held-out "
        "contexts with shared uniforms, sample quality (perplexity under the teacher and an optional reference, "
        "unigram entropy, distinct-2/3, longest repeated n-gram) with and without the frequency penalty, and decode "
        "tokens/s of AR vs the student at each k. Writes eval.json, eval.md and PNG plots.")
    add_options(p, EvalConfig, [f.name for f in dataclasses.fields(EvalConfig)])
    p.set_defaults(func=_eval)


def _eval(args):
    from ..runtime import run_lock
    from ..workflows.evaluate import EvalConfig, run_eval, save_results
    from ..workflows.report import eval_tables, write_eval_report

    if args.out_dir is None:
        student = Path(args.student).expanduser()
        args.out_dir = str(student / "eval" if student.is_dir() and (student / "latest.json").is_file()
                           else student.parent / "eval")
    _refuse_file(args.out_dir)
    config = config_from_args(EvalConfig, args)
    with run_lock(config.out_dir, "eval"):  # one evaluation writes into a folder at a time
        results = run_eval(config)
        save_results(results, config.out_dir)
        write_eval_report(results, config.out_dir, plots=config.plots)
    print(eval_tables(results))
    print(f"results: {config.out_dir}/eval.json, {config.out_dir}/eval.md", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------
# demo


def _add_demo_parser(subparsers):
    p = _new_parser(
        subparsers, "demo", "the whole method end to end: corpus -> teacher -> students -> eval -> report",
        "Build the default corpus (the Python stdlib), train a tiny AR teacher, distil it into push-forward students "
        "k = 1 -> 2 -> 4 and into a draft student on the frozen teacher, evaluate them (coupled agreement, verified "
        "and unverified decoding, sample quality, decode speed), print a summary table and write a report folder "
        "(Markdown + plots + checkpoints). About 7 minutes on a 2-core CPU by default, 1 with --quick; --full is a "
        "real run for a GPU. Re-running resumes: finished phases and stages are kept.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 1 minute on a 2-core CPU (a smoke run)")
    size.add_argument("--full", action="store_true", help="the small preset, trained for real (a GPU)")
    p.add_argument("--out", default=None, help="report folder (default: runs/demo, runs/demo-quick, runs/demo-full)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_demo)


def _demo(args):
    from .demo import run_demo

    if args.out:
        _refuse_file(args.out)
    profile = "quick" if args.quick else "full" if args.full else "default"
    result = run_demo(profile, out_dir=args.out, device=args.device, threads=args.threads,
                      progress=not args.no_progress)
    print(result["summary"])
    print(f"report: {result['report']}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# serving with vLLM


def _add_export_vllm_parser(subparsers):
    p = _new_parser(
        subparsers, "export-vllm", "write a draft student as a checkpoint vLLM serves as its speculative drafter",
        "Write a chain-pathway draft student of a Hugging Face teacher as an EAGLE-style drafter checkpoint for "
        "vLLM (config.json + model.safetensors; the teacher's embedding and LM head are shared by vLLM). Serve it "
        "with `kforcing serve` (docs/serving.md). Runs where the student was distilled; vLLM is not needed here.")
    p.add_argument("--student", required=True, help="the draft student (checkpoint or distill run directory)")
    p.add_argument("--teacher", default=None,
                   help="its Hugging Face teacher, hf:PATH (default: the one the student's checkpoint names)")
    p.add_argument("--out", required=True, help="the folder to write (created)")
    p.set_defaults(func=_export_vllm)


def _export_vllm(args):
    from ..serving.vllm_export import export_vllm_head
    from ..workflows.loading import load_model

    _refuse_file(args.out)
    student, _, _ = load_model(args.student, with_tokenizer=False, teacher=args.teacher)
    if getattr(student, "model_type", None) != "draft":
        raise ValueError(f"--student {args.student} is not a draft student (vLLM serves draft students as "
                         "speculative drafters)")
    out = export_vllm_head(student, args.out)
    teacher = getattr(student.teacher, "source", None) or "TEACHER_FOLDER"
    print(f"exported: {out}")
    print(f"serve it (in vLLM's environment): kforcing serve --teacher {teacher} --drafter {out}")
    return 0


def _add_serve_parser(subparsers):
    p = _new_parser(
        subparsers, "serve", "serve a Hugging Face teacher with vLLM, its exported kforcing drafter proposing",
        "Start vLLM's OpenAI-compatible server (`vllm serve`) for the teacher, with the drafter exported by "
        "`kforcing export-vllm` as its speculative method 'eagle' (lossless: vLLM verifies every draft). Needs vLLM "
        "and kforcing installed in one environment (docs/serving.md). Arguments after `--` go to `vllm serve` as "
        "they are (e.g. -- --port 8000 --max-num-seqs 64).")
    p.add_argument("--teacher", required=True, help="the teacher's Hugging Face folder (PATH or hf:PATH)")
    p.add_argument("--drafter", required=True, help="the folder `kforcing export-vllm` wrote")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="drafts per step (default: the student's max_k - 1)")
    p.add_argument("--print-command", action="store_true", help="print the vllm command line instead of running it")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: arguments for `vllm serve`")
    p.set_defaults(func=_serve)


def _serve(args):
    import shlex

    from ..serving.vllm_serve import require_vllm, serve_command, vllm_cli

    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    command = serve_command(args.teacher, args.drafter, args.num_speculative_tokens, extra)
    if args.print_command:
        print(shlex.join(command))
        return 0
    require_vllm()
    print(f"kforcing serve: {shlex.join(command)}", file=sys.stderr, flush=True)
    return vllm_cli(command[1:])


def _refuse_file(path):
    """--out must name a directory (new or existing), not a file."""
    if Path(path).expanduser().is_file():
        raise ValueError(f"--out {path} is an existing file; --out names a directory")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kforcing", allow_abbrev=False,
        description="K-Forcing: train an AR teacher, distil it into a student that samples k tokens per forward pass, "
                    "evaluate it, or run it all with `kforcing demo`.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_train_parser(subparsers)
    _add_sample_parser(subparsers)
    _add_distill_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_export_vllm_parser(subparsers)
    _add_serve_parser(subparsers)
    return parser


def main(argv=None):
    """Entry point of the `kforcing` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..checkpoints.checkpoint import CheckpointError
    from ..data import CorpusError, DataCacheError, TokenizerError
    from ..training.trainer import TrainingError

    if getattr(args, "out_dir", None):
        try:
            _refuse_file(args.out_dir)
        except ValueError as error:
            parser.exit(2, f"kforcing: error: {error}\n")
    try:
        return args.func(args)
    except (ValueError, CorpusError, DataCacheError, TokenizerError, CheckpointError, TrainingError) as error:
        if os.environ.get("KFORCING_DEBUG"):
            raise
        parser.exit(2, f"kforcing: error: {error}\n")
    except OSError as error:  # an unwritable --out, a full disk: what failed, on which path, in one line
        if os.environ.get("KFORCING_DEBUG"):
            raise
        parser.exit(1, f"kforcing: error: {error}\n")
    except KeyboardInterrupt as interrupt:
        parser.exit(130, f"kforcing: interrupted{f'; {interrupt}' if str(interrupt) else ''}\n")


