"""Teacher training: an AR Transformer on a corpus, with exact resumption and DDP (`kforcing train-teacher`).

    kforcing train-teacher --config tiny --corpus stdlib --out runs/teacher
    torchrun --nproc_per_node 2 -m kforcing.cli train-teacher --config small --out runs/teacher-small

What a run does:
- Tokenizer: loads `tokenizer` (a tokenizer.json path or a hub name) or trains a byte-level BPE of `vocab_size`
  tokens on the corpus; it is saved as RUN/tokenizer.json and with every checkpoint.
- Data: the corpus is tokenised once into RUN/data (or `data_dir`), memory-mapped, with a held-out split
  (`kforcing.data.prepare_dataset`). Batch `step` is a pure function of (seed, step, sample index).
- Loss: next-token cross-entropy; validation: the same on eval_batches held-out batches, logged as
  {"step", "val_loss", "val_ppl"} at step 0, every eval_interval steps and at the end.
- Everything else (AdamW, schedule, accumulation, DDP, autocast, logging, checkpoints, exact resumption with
  `resume=True`, `stop_after`) is the shared loop of `kforcing.training.trainer`; rank 0 prepares the data.
- Checkpoints record their `Provenance` (the token cache, the sequence length, these settings), from which
  `kforcing distill` and `kforcing eval` find the teacher's data.
"""

import contextlib
import dataclasses
import math
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import Provenance, RunLayout
from ..data import TokenDataset, Tokenizer, iter_documents, load_tokenizer, prepare_dataset, train_tokenizer
from ..models.transformer import PRESETS, ARModel, ModelConfig
from ..options import option
from ..runtime import resolve_device, run_lock
from .trainer import (DistInfo, Trainer, TrainingTask, check_loop_options, distributed, loop_option, warmup_cosine_lr,
                      warn_changed_settings)

DEFAULT_LR = {"tiny": 2e-3, "small": 6e-4, "base": 3e-4}


def _megabytes(value):
    return None if value is None else int(value * 1e6)


@dataclasses.dataclass
class TrainConfig:
    """Everything a teacher-training run needs; each field's help is its `kforcing train-teacher` flag's.

    None means "the preset's default" for vocab_size, seq_len, lr and dropout.
    """

    out_dir: str = option(help="run directory", flag="--out", required=True)
    preset: str = option("tiny", "model preset", flag="--config", choices=sorted(PRESETS))
    corpus: List[str] = option(["stdlib"], "'stdlib' (the running Python's stdlib sources + pydoc topics), a text "
                               "file, a directory, a glob, a .jsonl file, or hf:NAME[:CONFIG][@SPLIT]; repeat to "
                               "combine (default: stdlib)", convert=lambda specs: specs or ["stdlib"],
                               action="append", flag_default=None)
    text_field: str = option("text", "the text field of JSONL records / dataset rows")
    corpus_max_bytes: Optional[int] = option(None, "read at most this many MB of the corpus", flag="--corpus-max-mb",
                                             convert=_megabytes, type=float)
    tokenizer: Optional[str] = option(None, "a tokenizer.json path or hub name; default: train a byte-level BPE on "
                                      "the corpus")
    vocab_size: Optional[int] = option(None, "BPE vocabulary size (default: the preset's)")
    data_dir: Optional[str] = option(None, "token cache directory (default: OUT/data)")
    rebuild_data: bool = option(False, "re-tokenise even if a token cache exists")
    val_fraction: float = option(0.01, "share of documents held out for validation")
    seq_len: Optional[int] = option(None, "training sequence length (default: max_seq_len)")
    batch_size: int = loop_option("batch_size")
    grad_accum: int = loop_option("grad_accum")
    steps: int = option(2000, "optimizer steps")
    lr: Optional[float] = option(None, "peak learning rate (default: tiny 2e-3, small 6e-4, base 3e-4)")
    min_lr_ratio: float = loop_option("min_lr_ratio")
    warmup_steps: int = loop_option("warmup_steps")
    weight_decay: float = loop_option("weight_decay")
    beta1: float = loop_option("beta1")
    beta2: float = loop_option("beta2")
    grad_clip: float = loop_option("grad_clip")
    dropout: Optional[float] = option(None, "residual dropout (default: the preset's, 0)")
    eval_interval: int = loop_option("eval_interval", help="steps between validation losses")
    eval_batches: int = option(20, "batches per validation loss")
    save_interval: int = loop_option("save_interval")
    log_interval: int = loop_option("log_interval")
    keep_checkpoints: int = loop_option("keep_checkpoints")
    seed: int = option(0, "seed of the initialisation and the data order")
    device: str = loop_option("device")
    dtype: str = loop_option("dtype")
    compile: bool = loop_option("compile")
    resume: bool = loop_option("resume")
    stop_after: Optional[int] = loop_option("stop_after")
    tensorboard: bool = loop_option("tensorboard")
    progress: bool = loop_option("progress")

    def validate(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown --config {self.preset!r}; choose one of {sorted(PRESETS)}")
        check_loop_options(self)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in [1, steps={self.steps}], got {self.stop_after}")

    def model_config(self, vocab_size) -> ModelConfig:
        overrides = {"vocab_size": vocab_size}
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        config = ModelConfig.from_preset(self.preset, **overrides)
        if self.seq_len is not None and self.seq_len > config.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds the {self.preset} preset's max_seq_len="
                             f"{config.max_seq_len}")
        return config

    def effective_lr(self):
        return self.lr if self.lr is not None else DEFAULT_LR[self.preset]


def lr_at(step, config: TrainConfig):
    """The teacher's learning rate at `step` (warmup + cosine decay, see warmup_cosine_lr)."""
    return warmup_cosine_lr(step, config.steps, config.effective_lr(), config.warmup_steps, config.min_lr_ratio)


# ---------------------------------------------------------------------------------------------------------
# Setup


def _prepare_tokenizer(config: TrainConfig, layout: RunLayout, resuming: bool) -> Tokenizer:
    if layout.tokenizer.is_file():
        return load_tokenizer(layout.tokenizer)
    if resuming:
        raise ckpt.CheckpointError(f"{layout.root} holds a checkpoint but no tokenizer.json")
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        vocab = config.vocab_size or PRESETS[config.preset]["vocab_size"]
        texts = (text for _, text in iter_documents(config.corpus, config.text_field, config.corpus_max_bytes))
        tokenizer = train_tokenizer(texts, vocab_size=vocab)
    tokenizer.save(layout.tokenizer)
    return tokenizer


def _prepare_data(config: TrainConfig, layout: RunLayout, info: DistInfo, resuming: bool):
    """(tokenizer, token dataset): rank 0 builds them, the others wait and then reuse them."""
    data_dir = Path(config.data_dir) if config.data_dir else layout.data
    if info.main:
        tokenizer = _prepare_tokenizer(config, layout, resuming)
        dataset = prepare_dataset(config.corpus, tokenizer, data_dir, config.val_fraction, config.text_field,
                                  config.corpus_max_bytes, rebuild=config.rebuild_data and not resuming,
                                  progress=config.progress)
    info.barrier()
    if not info.main:
        tokenizer = load_tokenizer(layout.tokenizer)
        dataset = prepare_dataset(config.corpus, tokenizer, data_dir, config.val_fraction, config.text_field,
                                  config.corpus_max_bytes, verify=False)
    return tokenizer, dataset


_TRAJECTORY_FIELDS = ("preset", "corpus", "corpus_max_bytes", "seq_len", "batch_size", "grad_accum", "steps", "lr",
                      "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "dropout", "seed",
                      "dtype")


# ---------------------------------------------------------------------------------------------------------
# The task


class TeacherTask(TrainingTask):
    """Next-token cross-entropy of an ARModel on batches of the token cache."""

    name = "train-teacher"
    unit = "tokens"

    def __init__(self, config: TrainConfig, model: ARModel, dataset: TokenDataset, seq_len: int, info: DistInfo,
                 device):
        self.config, self.model, self.dataset, self.seq_len = config, model, dataset, seq_len
        self.info, self.device = info, device
        self.units_per_step = config.batch_size * config.grad_accum * info.world * seq_len
        self.first_val_loss = None

    def loss(self, module, step, first_index):
        x, y = self.dataset.batch("train", step, self.config.batch_size, self.seq_len, self.config.seed,
                                  first_index=first_index, device=self.device)
        return F.cross_entropy(module(x).float().flatten(0, 1), y.flatten()), {}

    @torch.no_grad()
    def evaluate(self, step, phase, model):
        # The same eval_batches batches whatever the world size: rank r evaluates batches r, r + world, ...
        config, info = self.config, self.info
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with self.autocast():
            for i in range(info.rank, config.eval_batches, info.world):
                x, y = self.dataset.batch("val", i, config.batch_size, self.seq_len, config.seed, device=self.device)
                total[0] += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).double()
                total[1] += 1
        model.train()
        if info.enabled:
            dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        if self.first_val_loss is None:
            self.first_val_loss = loss
        return {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}, False

    def provenance(self, step):
        return Provenance("teacher", step, str(self.dataset.directory.resolve()), self.seq_len,
                          dataclasses.asdict(self.config))

    def state(self):
        return {"seq_len": self.seq_len}

    def check_resume(self, directory, config):
        saved_config = ModelConfig.from_dict(config["model"])
        if saved_config != self.model.config:
            raise ckpt.CheckpointError(
                f"the checkpoint in {self.config.out_dir} was trained with another model config "
                f"({ckpt.describe_config_difference(saved_config, self.model.config)}; checkpoint vs this run's "
                f"--config {self.config.preset}); resume with the run's original settings or choose another --out")
        provenance = ckpt.Provenance.from_config(config)
        warn_changed_settings(provenance.settings if provenance else {}, dataclasses.asdict(self.config),
                              _TRAJECTORY_FIELDS, self.info.main)


# ---------------------------------------------------------------------------------------------------------
# The run


def train_teacher(config: TrainConfig) -> dict:
    """Train (or resume) an AR teacher; returns a summary {"step", "train_loss", "val_loss", "checkpoint", ...}.

    Raises ValueError for bad settings, kforcing.data.CorpusError / TokenizerError / DataCacheError for data
    problems, kforcing.checkpoints.checkpoint.CheckpointError when resuming from a checkpoint that does not fit, and
    kforcing.training.trainer.TrainingError when the loss stops being finite.
    """
    config.validate()
    with distributed(config.device) as info:
        # One writer per run directory (under torchrun, rank 0 holds the lock for all ranks).
        with run_lock(config.out_dir, "train-teacher") if info.main else contextlib.nullcontext():
            return _train(config, info)


def _train(config: TrainConfig, info: DistInfo) -> dict:
    device = resolve_device(config.device, info.local_rank)
    layout = RunLayout(config.out_dir)
    if info.main:
        layout.claim("teacher", "train-teacher")
    start = ckpt.find_resume_checkpoint(layout.root)
    if start is not None and not config.resume:
        raise ValueError(f"{layout.root} already holds a training run; pass --resume to continue it, or choose "
                         "another --out")
    if info.main:
        layout.root.mkdir(parents=True, exist_ok=True)
        if config.resume and start is None:
            print(f"kforcing: no checkpoint in {layout.root}; starting from scratch", file=sys.stderr)
    tokenizer, dataset = _prepare_data(config, layout, info, resuming=start is not None)

    model_config = config.model_config(tokenizer.vocab_size)
    seq_len = config.seq_len or model_config.max_seq_len
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = ARModel(model_config).to(device)
    task = TeacherTask(config, model, dataset, seq_len, info, device)
    end = config.stop_after if config.stop_after is not None else config.steps
    trainer = Trainer(task, model, config, layout, info, device, config.steps, end, config.effective_lr(),
                      tokenizer=tokenizer)
    torch.manual_seed(config.seed + 1000003 * info.rank)  # per-rank dropout streams (a resume restores its own)
    if start is not None:
        trainer.resume(start)
    trainer.run()
    checkpoint = trainer.checkpoint
    if checkpoint is None and info.main:
        checkpoint = ckpt.find_resume_checkpoint(layout.root)
    return {"step": trainer.step, "train_loss": trainer.last.get("train_loss"),
            "val_loss": trainer.last.get("val_loss"), "first_val_loss": task.first_val_loss,
            "checkpoint": str(checkpoint) if checkpoint else None, "params": model.num_params(), "seq_len": seq_len,
            "global_batch": config.batch_size * config.grad_accum * info.world, "data": _data_summary(dataset)}


def _data_summary(dataset: TokenDataset) -> dict:
    meta = dataset.meta
    return {key: meta.get(key) for key in ("corpus", "max_bytes", "vocab_size", "train_tokens", "val_tokens",
                                           "train_documents", "val_documents")}


__all__ = ["DEFAULT_LR", "TeacherTask", "TrainConfig", "lr_at", "train_teacher"]
