"""The `kforcing` command line.

    kforcing train-teacher --config tiny --corpus stdlib --out runs/teacher
    kforcing sample --ckpt runs/teacher --prompt "def main(" --max-new-tokens 64
    kforcing sample --ckpt runs/student --prompt "def main(" --k 4

Run `kforcing <command> --help` for every option. Errors in the input (a missing corpus, a bad checkpoint, a
prompt that is too long, ...) print one line `kforcing: error: ...` and exit with status 2; set KFORCING_DEBUG=1
for the traceback.
"""

import argparse
import os
import sys
import time



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
    g.add_argument("--batch-size", type=int, default=16, help="sequences per step per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: tiny 2e-3, small 6e-4, "
                                                          "base 3e-4)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (cosine)")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bfloat16 on GPU, float32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps, keeping the --steps schedule")
    g.add_argument("--eval-interval", type=int, default=200, help="steps between validation losses")
    g.add_argument("--eval-batches", type=int, default=20, help="batches per validation loss")
    g.add_argument("--save-interval", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--log-interval", type=int, default=10, help="steps between metrics lines")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept on disk")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to OUT/tensorboard")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_train_teacher)


def _train_teacher(args):
    from .train import TrainConfig, train_teacher

    config = TrainConfig(
        out_dir=args.out, preset=args.config, corpus=args.corpus or ["stdlib"], text_field=args.text_field,
        corpus_max_bytes=None if args.corpus_max_mb is None else int(args.corpus_max_mb * 1e6),
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, data_dir=args.data_dir, rebuild_data=args.rebuild_data,
        val_fraction=args.val_fraction, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, dropout=args.dropout,
        eval_interval=args.eval_interval, eval_batches=args.eval_batches, save_interval=args.save_interval,
        log_interval=args.log_interval, keep_checkpoints=args.keep_checkpoints, seed=args.seed, device=args.device,
        dtype=args.dtype, compile=args.compile, resume=args.resume, stop_after=args.stop_after,
        tensorboard=args.tensorboard, progress=not args.no_progress)
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


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kforcing", description="K-Forcing: train an AR teacher and sample k tokens per forward pass.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_train_parser(subparsers)
    _add_sample_parser(subparsers)
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
