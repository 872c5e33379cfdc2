"""Teacher training: an AR Transformer on a corpus, with exact resumption and DDP (`kforcing train-teacher`).

    kforcing train-teacher --config tiny --corpus stdlib --out runs/teacher
    torchrun --nproc_per_node 2 -m kforcing.cli train-teacher --config small --out runs/teacher-small

What a run does:
- Tokenizer: loads `tokenizer` (a tokenizer.json path or a hub name) or trains a byte-level BPE of `vocab_size`
  tokens on the corpus; it is saved as RUN/tokenizer.json and with every checkpoint.
- Data: the corpus is tokenised once into RUN/data (or `data_dir`), memory-mapped, with a held-out split
  (`kforcing.data.prepare_dataset`). Batch `step` is a pure function of (seed, step, sample index).
- Optimisation: AdamW (no weight decay on norms), linear warmup then cosine decay to min_lr_ratio * lr, global
  gradient-norm clipping, bf16 autocast on GPU (`dtype`), optional torch.compile.
- Logging: a tqdm bar; RUN/metrics.jsonl gets {"step", "train_loss", "lr", "grad_norm", "tokens_per_s", ...}
  every log_interval steps and {"step", "val_loss"} every eval_interval steps (and at step 0); TensorBoard
  event files too with `tensorboard=True` (needs the tensorboard package).
- Checkpoints: every save_interval steps and at the end, in RUN/checkpoints/step_NNNNNNN, written atomically
  (`kforcing.checkpoint`), with the optimizer, the step and every rank's RNG states; RUN/latest.json points to
  the newest and only the last `keep_checkpoints` are kept.
- Resuming (`resume=True`) restores all of that: running N steps straight gives bit-for-bit the same weights as
  stopping after N/2 (`stop_after`) and resuming, on the same machine and world size.
- DDP: under torchrun (WORLD_SIZE > 1) each rank trains on its own samples of the global batch (NCCL on GPU,
  gloo on CPU); rank 0 prepares the data and writes logs and checkpoints. With the same global batch, 2 ranks x
  batch b computes the same update as 1 process with batch b and grad_accum 2.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from .data import Tokenizer, iter_documents, load_tokenizer, prepare_dataset, train_tokenizer
from .model import ARModel, ModelConfig, PRESETS

DEFAULT_LR = {"tiny": 2e-3, "small": 6e-4, "base": 3e-4}


@dataclasses.dataclass
class TrainConfig:
    """Everything a teacher-training run needs; `kforcing train-teacher --help` documents each flag.

    None means "the preset's default" for vocab_size, seq_len, lr and dropout.
    """

    out_dir: str
    preset: str = "tiny"
    corpus: List[str] = dataclasses.field(default_factory=lambda: ["stdlib"])
    text_field: str = "text"
    corpus_max_bytes: Optional[int] = None
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None
    data_dir: Optional[str] = None
    rebuild_data: bool = False
    val_fraction: float = 0.01
    seq_len: Optional[int] = None
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 2000
    lr: Optional[float] = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: Optional[float] = None
    eval_interval: int = 200
    eval_batches: int = 20
    save_interval: int = 1000
    log_interval: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    resume: bool = False
    stop_after: Optional[int] = None
    tensorboard: bool = False
    progress: bool = True

    def validate(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown --config {self.preset!r}; choose one of {sorted(PRESETS)}")
        positive = ("batch_size", "grad_accum", "steps", "eval_interval", "eval_batches", "save_interval",
                    "log_interval", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in [1, steps={self.steps}], got {self.stop_after}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

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


def warmup_cosine_lr(step, steps, peak, warmup, min_lr_ratio):
    """Linear warmup over `warmup` steps to `peak`, then cosine decay to min_lr_ratio * peak at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    floor = peak * min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def lr_at(step, config: TrainConfig):
    """The teacher's learning rate at `step` (warmup + cosine decay, see warmup_cosine_lr)."""
    return warmup_cosine_lr(step, config.steps, config.effective_lr(), config.warmup_steps, config.min_lr_ratio)


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()


def _init_distributed(device_name) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_name.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return _Dist(rank, world, local_rank)


def _resolve_device(name, info: _Dist):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def _all_mean(value: float, info: _Dist, device) -> float:
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world


# ---------------------------------------------------------------------------------------------------------
# Setup


def _prepare_tokenizer(config: TrainConfig, out: Path, resuming: bool) -> Tokenizer:
    saved = out / "tokenizer.json"
    if saved.is_file():
        return load_tokenizer(saved)
    if resuming:
        raise ckpt.CheckpointError(f"{out} holds a checkpoint but no tokenizer.json")
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        vocab = config.vocab_size or PRESETS[config.preset]["vocab_size"]
        texts = (text for _, text in iter_documents(config.corpus, config.text_field, config.corpus_max_bytes))
        tokenizer = train_tokenizer(texts, vocab_size=vocab)
    tokenizer.save(saved)
    return tokenizer


def param_groups(model, weight_decay, scaled_prefix=None, lr_scale=1.0):
    """AdamW groups: weight decay on matrices only; parameters named `scaled_prefix*` train at lr_scale x lr.

    Each group carries its "lr_scale"; the training loops set group["lr"] = lr * group["lr_scale"].
    """
    groups = []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for scaled in (False, True):
        members = [p for n, p in named if (scaled_prefix is not None and n.startswith(scaled_prefix)) == scaled]
        for decay in (True, False):
            chosen = [p for p in members if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": weight_decay if decay else 0.0,
                               "lr_scale": lr_scale if scaled else 1.0})
    return groups


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _trim_metrics(path: Path, step: int):
    """On resume: drop lines logged after the checkpoint's step by the interrupted run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class _Metrics:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------------
# The training loop


def train_teacher(config: TrainConfig) -> dict:
    """Train (or resume) an AR teacher; returns a summary {"step", "train_loss", "val_loss", "checkpoint", ...}.

    Raises ValueError for bad settings, kforcing.data.CorpusError / TokenizerError / DataCacheError for data
    problems, and kforcing.checkpoint.CheckpointError when resuming from a checkpoint that does not fit.
    """
    config.validate()
    info = _init_distributed(config.device if config.device != "auto" else
                             ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return _train(config, info)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, info: _Dist) -> dict:
    device = _resolve_device(config.device, info)
    out = Path(config.out_dir)
    latest = out / ckpt.LATEST
    resuming = config.resume and latest.is_file()
    if latest.is_file() and not config.resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        if config.resume and not resuming:
            print(f"kforcing: no checkpoint in {out}; starting from scratch", file=sys.stderr)

    # Tokenizer and data: rank 0 builds them, the others wait and then reuse them.
    data_dir = Path(config.data_dir) if config.data_dir else out / "data"
    if info.main:
        tokenizer = _prepare_tokenizer(config, out, resuming)
        dataset = prepare_dataset(config.corpus, tokenizer, data_dir, config.val_fraction, config.text_field,
                                  config.corpus_max_bytes, rebuild=config.rebuild_data and not resuming,
                                  progress=config.progress)
    info.barrier()
    if not info.main:
        tokenizer = load_tokenizer(out / "tokenizer.json")
        dataset = prepare_dataset(config.corpus, tokenizer, data_dir, config.val_fraction, config.text_field,
                                  config.corpus_max_bytes, verify=False)

    model_config = config.model_config(tokenizer.vocab_size)
    seq_len = config.seq_len or model_config.max_seq_len
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = ARModel(model_config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.effective_lr(),
                                  betas=(config.beta1, config.beta2), fused=device.type == "cuda")
    start_step = 0
    if resuming:
        directory = ckpt.resolve_checkpoint(out)
        saved = ckpt.read_config(directory)
        saved_config = ModelConfig.from_dict(saved["model"])
        if saved_config != model_config:
            raise ckpt.CheckpointError(
                f"the checkpoint in {out} was trained with another model config "
                f"({ckpt.describe_config_difference(saved_config, model_config)}; checkpoint vs this run's "
                f"--config {config.preset}); resume with the run's original settings or choose another --out")
        ckpt.load_weights(model, directory)
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
        state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
        if state["world_size"] != info.world:
            raise ckpt.CheckpointError(f"the checkpoint was written by {state['world_size']} process(es) but this run "
                                       f"has {info.world}; exact resumption needs the same world size")
        start_step = state["step"]
        _set_rng_state(state["rng"][info.rank], device)
        _warn_changed_settings(saved.get("extra", {}).get("train", {}), config, info)
    else:
        torch.manual_seed(config.seed + 1000003 * info.rank)  # per-rank dropout streams

    train_model = model
    if config.compile:
        train_model = torch.compile(train_model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    use_bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    metrics = _Metrics(out, info.main, config.tensorboard)
    if info.main and resuming:
        _trim_metrics(metrics.path, start_step)
    elif info.main and metrics.path.exists():
        metrics.path.unlink()
    summary = {"step": start_step, "train_loss": None, "val_loss": None, "checkpoint": None,
               "params": model.num_params(), "seq_len": seq_len,
               "global_batch": config.batch_size * config.grad_accum * info.world}

    def evaluate(step):
        # The same eval_batches batches whatever the world size: rank r evaluates batches r, r + world, ...
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad(), autocast:
            for i in range(info.rank, config.eval_batches, info.world):
                x, y = dataset.batch("val", i, config.batch_size, seq_len, config.seed, device=device)
                logits = model(x)
                total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).double()
                total[1] += 1
        model.train()
        if info.enabled:
            dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        metrics.log({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
        summary["val_loss"] = loss
        summary.setdefault("first_val_loss", loss)
        return loss

    def save(step):
        rng = [_rng_state(device)]
        if info.enabled:
            rng = [None] * info.world
            dist.all_gather_object(rng, _rng_state(device))
        if info.main:
            directory = out / "checkpoints" / f"step_{step:07d}"
            trainer_state = {"step": step, "rng": rng, "world_size": info.world, "seq_len": seq_len}
            ckpt.save_checkpoint(directory, model, tokenizer, optimizer, trainer_state,
                                 extra={"train": dataclasses.asdict(config), "step": step})
            ckpt.write_latest(out, directory, step)
            _prune(out / "checkpoints", config.keep_checkpoints, keep=directory)
            summary["checkpoint"] = str(directory)
        info.barrier()

    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and info.main),
               desc="train-teacher", unit="step", dynamic_ncols=True)
    model.train()
    if start_step == 0:
        evaluate(0)
    end = config.stop_after if config.stop_after is not None else config.steps
    tokens_per_step = config.batch_size * config.grad_accum * info.world * seq_len
    window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
    step = start_step
    while step < end:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # optimizer states saved before lr_scale lack it
        step_loss = 0.0
        for micro in range(config.grad_accum):
            first = (micro * info.world + info.rank) * config.batch_size
            x, y = dataset.batch("train", step, config.batch_size, seq_len, config.seed, first_index=first,
                                 device=device)
            sync = micro == config.grad_accum - 1 or not info.enabled
            with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
                logits = train_model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / config.grad_accum
            loss.backward()
            step_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss += step_loss
        window_steps += 1
        bar.update(1)
        if step % config.log_interval == 0 or step == end:
            elapsed = time.perf_counter() - window_start
            train_loss = _all_mean(window_loss / window_steps, info, device)
            metrics.log({"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                         "tokens": step * tokens_per_step, "tokens_per_s": window_steps * tokens_per_step / elapsed})
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
            summary["train_loss"] = train_loss
            window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
        if step % config.eval_interval == 0 or step == config.steps:
            evaluate(step)
        if step % config.save_interval == 0 or step == end:
            save(step)
    bar.close()
    metrics.close()
    summary["step"] = step
    if summary["checkpoint"] is None and info.main and latest.is_file():
        summary["checkpoint"] = str(ckpt.resolve_checkpoint(out))
    return summary


_TRAJECTORY_FIELDS = ("preset", "corpus", "corpus_max_bytes", "seq_len", "batch_size", "grad_accum", "steps", "lr",
                      "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "dropout", "seed",
                      "dtype")


def _warn_changed_settings(saved: dict, config: TrainConfig, info: _Dist):
    """Resuming with other optimisation or data settings is allowed (e.g. more steps) but is no longer exact."""
    current = dataclasses.asdict(config)
    changed = [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in _TRAJECTORY_FIELDS
               if key in saved and saved[key] != current[key]]
    if changed and info.main:
        print("kforcing: resuming with changed settings (" + "; ".join(changed) + "): the run will differ from "
              "one that never stopped", file=sys.stderr)


def _prune(directory: Path, keep_last: int, keep: Path):
    checkpoints = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for path in checkpoints[:-keep_last]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


__all__ = ["DEFAULT_LR", "TrainConfig", "lr_at", "param_groups", "train_teacher", "warmup_cosine_lr"]
