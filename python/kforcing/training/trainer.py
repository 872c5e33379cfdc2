"""The one training loop, shared by the teacher (`kforcing.training.train`) and every distillation stage
(`kforcing.workflows.distill`).

What a task brings (`TrainingTask`): the module to differentiate, the loss of one micro-batch, its evaluation and
what it records in a checkpoint. What the loop does for every task:

- Optimisation: AdamW (no weight decay on norms and embeddings' biases; an optional learning-rate multiplier for
  one group of parameters), linear warmup then cosine decay to min_lr_ratio * lr (`warmup_cosine_lr`), gradient
  accumulation, global gradient-norm clipping, bf16 autocast on GPU (`dtype`), optional torch.compile, and with
  `ema_decay` an exponential moving average of the weights (`EMA`), which is what is evaluated and exported.
- DDP: under torchrun (WORLD_SIZE > 1) rank r computes micro-batch samples (micro * world + r) * batch_size + i,
  so 2 ranks x batch b make the same update as 1 process with batch b and grad_accum 2. Rank 0 writes.
- Logging: a tqdm bar; RUN/metrics.jsonl gets the running means of the task's statistics every log_interval steps
  and the task's evaluation records at step 0, every eval_interval steps and at the end; TensorBoard events too
  with `tensorboard=True`.
- Checkpoints (`kforcing.checkpoints.checkpoint`): every save_interval steps and at the end, in RUN/checkpoints/step_N,
  with the optimizer, the step, every rank's RNG states and the task's state; RUN/latest.json points to the newest and
  only the last `keep_checkpoints` are kept.
- Exact resumption: running N steps straight gives bit-for-bit the same weights as stopping after N/2
  (`stop_after`) and resuming, on the same machine and world size: batches and noise are pure functions of the
  step, and everything else is in the checkpoint.
- A non-finite loss or gradient norm stops the run with `TrainingError` before the step is applied or saved.
"""

import abc
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import Provenance, RunLayout
from ..options import option

RAW_WEIGHTS_FILE = "raw_weights.safetensors"  # with an EMA: the optimised weights (model.safetensors: their EMA)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient)."""


# ---------------------------------------------------------------------------------------------------------
# The loop's options, shared by TrainConfig and DistillConfig (one definition: field, default, flag and help)


_LOOP_OPTIONS = {
    "batch_size": (16, "sequences per step per process"),
    "grad_accum": (1, "micro-batches accumulated per step"),
    "min_lr_ratio": (0.1, "final lr as a fraction of the peak (cosine)"),
    "warmup_steps": (100, "linear warmup steps"),
    "weight_decay": (0.1, "AdamW weight decay (matrices only)"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.95, "AdamW beta2"),
    "grad_clip": (1.0, "global gradient-norm clip"),
    "eval_interval": (200, "steps between validations"),
    "save_interval": (1000, "steps between checkpoints"),
    "log_interval": (10, "steps between metrics lines"),
    "keep_checkpoints": (2, "checkpoints kept on disk"),
    "device": ("auto", "cpu, cuda, cuda:N or auto"),
    "dtype": ("auto", "autocast dtype; auto = bfloat16 on GPU, float32 on CPU"),
    "compile": (False, "torch.compile the model"),
    "resume": (False, "continue the run in OUT from its latest complete checkpoint"),
    "stop_after": (None, "stop (with a checkpoint) after this many steps, keeping the --steps schedule"),
    "tensorboard": (False, "also write TensorBoard events to OUT/tensorboard"),
    "progress": (True, "hide the progress bar"),
}
_LOOP_FLAGS = {"warmup_steps": {"flag": "--warmup"}, "progress": {"flag": "--no-progress", "action": "store_false"},
               "dtype": {"choices": ["auto", "float32", "bfloat16"]}}


def loop_option(name, default=dataclasses.MISSING, help=None):
    """The field of a shared training-loop option (same flag in train-teacher and distill), with this command's
    default or help text where they differ."""
    base_default, base_help = _LOOP_OPTIONS[name]
    return option(base_default if default is dataclasses.MISSING else default, help or base_help,
                  **_LOOP_FLAGS.get(name, {}))


def check_loop_options(config, error=ValueError):
    """Raise `error` for loop options out of range (shared by TrainConfig and DistillConfig)."""
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_batches", "save_interval", "log_interval",
                 "keep_checkpoints"):
        if getattr(config, name) < 1:
            raise error(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.warmup_steps < 0:
        raise error(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    if config.dtype not in ("auto", "float32", "bfloat16"):
        raise error(f"dtype must be auto, float32 or bfloat16, got {config.dtype!r}")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise error(f"min_lr_ratio must be in [0, 1], got {config.min_lr_ratio}")


def warn_changed_settings(saved: dict, current: dict, fields, main: bool):
    """Resuming with other optimisation or data settings is allowed (e.g. more steps) but is no longer exact."""
    changed = [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in fields
               if key in saved and saved[key] != current[key]]
    if changed and main:
        print("kforcing: resuming with changed settings (" + "; ".join(changed) + "): the run will differ from "
              "one that never stopped", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Schedule, parameter groups, EMA


def warmup_cosine_lr(step, steps, peak, warmup, min_lr_ratio):
    """Linear warmup over `warmup` steps to `peak`, then cosine decay to min_lr_ratio * peak at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    floor = peak * min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def param_groups(model, weight_decay, scaled_prefix=None, lr_scale=1.0):
    """AdamW groups: weight decay on matrices only; parameters named `scaled_prefix*` train at lr_scale x lr.

    Each group carries its "lr_scale"; the loop sets group["lr"] = lr * group["lr_scale"].
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


class EMA:
    """An exponential moving average of a model's floating-point parameters and buffers, in float32.

    decay after n updates: min(decay, (1 + n) / (10 + n)), so that short runs are not dominated by the initial
    weights. `copy_to(model)` writes the averages into a model.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: value.detach().float().clone() for name, value in model.state_dict().items()
                       if value.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        state = model.state_dict()
        for name, value in self.shadow.items():
            state[name].copy_(value)

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay, self.updates = state["decay"], state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


# ---------------------------------------------------------------------------------------------------------
# Processes


@dataclasses.dataclass
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

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

    def mean(self, value: float, device) -> float:
        """The mean of a float over all ranks."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world


@contextlib.contextmanager
def distributed(device_name: str):
    """The DistInfo of this process; under torchrun it joins the process group (NCCL on GPU, gloo on CPU) and
    leaves it at the end."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistInfo()
        return
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_name.startswith("cuda") else "gloo")
    try:
        yield DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """RUN/metrics.jsonl (rank 0 only), and TensorBoard events when asked for."""

    def __init__(self, layout: RunLayout, enabled: bool, tensorboard: bool, start_step: int):
        self.enabled = enabled
        self.path = layout.metrics
        self.writer = None
        if not enabled:
            return
        if start_step:  # resuming: drop what the interrupted run logged after its checkpoint
            lines = self.path.read_text().splitlines() if self.path.is_file() else []
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(layout.tensorboard))

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


class _Window:
    """Running sums of the logged training statistics since the last metrics line."""

    def __init__(self):
        self.sums, self.steps, self.start = {}, 0, time.perf_counter()

    def add(self, stats: Dict):
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1

    def means(self, info: DistInfo, device) -> Dict[str, float]:
        """Means over the window's steps and all ranks; a vector statistic "name_{}" becomes name_1, name_2, ..."""
        out = {}
        for name, total in self.sums.items():
            if isinstance(total, torch.Tensor):
                for j, value in enumerate(total.tolist()):
                    out[name.format(j + 1)] = info.mean(value / self.steps, device)
            else:
                out[name] = info.mean(total / self.steps, device)
        return out


# ---------------------------------------------------------------------------------------------------------
# The loop


class TrainingTask(abc.ABC):
    """What a run trains. The loop calls, in this order: `loss` for every micro-batch, `evaluate` at step 0 (phase
    "start"), every eval_interval steps ("interval") and at the last step ("end"), and `state` / `provenance` when
    it saves; `check_resume` and `load_state` when it resumes.

    Attributes: name (the progress bar's), unit and units_per_step (throughput: "tokens", "windows"), bar_stats
    ({short name: logged statistic} shown on the bar beside the loss). The Trainer gives the task its `autocast()`
    context (the one of the training forward), for evaluations that should run in the same precision.
    """

    name = "train"
    unit = "tokens"
    units_per_step = 0
    bar_stats: Dict[str, str] = {}

    @abc.abstractmethod
    def loss(self, module, step: int, first_index: int) -> Tuple[torch.Tensor, Dict]:
        """(loss of the micro-batch whose first sample index is first_index, {statistic: value to average})."""

    @abc.abstractmethod
    def evaluate(self, step: int, phase: str, model: nn.Module) -> Tuple[Dict, bool]:
        """(metrics record with "step", whether the run should end now)."""

    @abc.abstractmethod
    def provenance(self, step: int) -> Provenance:
        """What a checkpoint saved at `step` was trained from."""

    def state(self) -> Dict:
        """What this task adds to trainer_state.pt."""
        return {}

    def load_state(self, state: Dict):
        """Restore `state()` from a resumed trainer_state.pt."""

    def check_resume(self, directory: Path, config: dict):
        """Raise CheckpointError when the checkpoint cannot continue this run."""


class Trainer:
    """One run of the loop (see the module docstring) over `model` for `task`.

    Args:
        model: the module whose parameters are trained (a DDP/compile wrapper is made here).
        forward: the module called by `task.loss` (defaults to model); wrapped for compile and DDP.
        config: a TrainConfig or DistillConfig (the `loop_option` fields).
        steps: the length of the schedule; stop_at: where this invocation stops (<= steps).
        peak_lr: the schedule's peak; scaled_prefix / lr_scale: see `param_groups`.
        ema_decay: keep an EMA of the weights (evaluated, saved as model.safetensors); None: no EMA.
    """

    def __init__(self, task: TrainingTask, model: nn.Module, config, layout: RunLayout, info: DistInfo, device,
                 steps: int, stop_at: int, peak_lr: float, tokenizer=None, forward: Optional[nn.Module] = None,
                 scaled_prefix=None, lr_scale=1.0, ema_decay=None):
        self.task, self.model, self.config, self.layout = task, model, config, layout
        task.autocast = self.autocast
        self.info, self.device, self.steps, self.stop_at, self.peak_lr = info, device, steps, stop_at, peak_lr
        self.tokenizer = tokenizer
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, scaled_prefix, lr_scale),
                                           lr=peak_lr, betas=(config.beta1, config.beta2),
                                           fused=device.type == "cuda")
        self.ema = EMA(model, ema_decay) if ema_decay is not None else None
        self.averaged = None
        if self.ema is not None:
            self.averaged = copy.deepcopy(model).eval()
            self.averaged.requires_grad_(False)
        self.forward = self._wrap(forward if forward is not None else model)
        self.use_bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda")
        self.step = 0
        self.checkpoint: Optional[Path] = None
        self.metrics: Optional[MetricsLog] = None  # opened by run()
        self.last: Dict = {}  # the latest value of every logged metric

    def _wrap(self, module):
        if self.config.compile:
            module = torch.compile(module)
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel
            module = DistributedDataParallel(module, device_ids=[self.device.index]
                                             if self.device.type == "cuda" else None)
        return module

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def eval_model(self) -> nn.Module:
        """The weights to evaluate: the EMA's (copied into a model) with an EMA, else the trained model itself."""
        if self.ema is None:
            return self.model
        self.ema.copy_to(self.averaged)
        return self.averaged

    # -- resume and save ------------------------------------------------------------------------------------

    def resume(self, directory: Path):
        """Continue from a checkpoint of this run: weights, EMA, optimizer, step, RNG and the task's state."""
        config = ckpt.read_config(directory)
        self.task.check_resume(directory, config)
        state = ckpt.load_torch_file(directory, ckpt.TRAINER_STATE_FILE)
        if state["world_size"] != self.info.world:
            raise ckpt.CheckpointError(f"the checkpoint {directory} was written by {state['world_size']} "
                                       f"process(es) but this run has {self.info.world}; exact resumption needs "
                                       "the same world size")
        if self.ema is None:
            ckpt.load_weights(self.model, directory)
        else:
            ckpt.load_weights(self.averaged, directory)
            self.model.load_state_dict(ckpt.load_tensors(directory, RAW_WEIGHTS_FILE, self.device))
            self.ema.load_state_dict({"decay": state["ema_decay"], "updates": state["ema_updates"],
                                      "shadow": {n: v.float() for n, v in self.averaged.state_dict().items()
                                                 if v.is_floating_point()}})
        self.optimizer.load_state_dict(ckpt.load_torch_file(directory, ckpt.OPTIMIZER_FILE, self.device))
        self.task.load_state(state)
        self.step = state["step"]
        _set_rng_state(state["rng"][self.info.rank], self.device)
        if self.step >= self.steps and self.info.main:
            print(f"kforcing: {self.task.name}: {directory} is at step {self.step}, which reaches the {self.steps} "
                  "steps asked for: nothing left to train, the run is finished as it is", file=sys.stderr)

    def save(self):
        rng = [_rng_state(self.device)]
        if self.info.enabled:
            rng = [None] * self.info.world
            dist.all_gather_object(rng, _rng_state(self.device))
        if self.info.main:
            directory = self.layout.step_dir(self.step)
            state = {"step": self.step, "rng": rng, "world_size": self.info.world, **self.task.state()}
            tensors = None
            if self.ema is not None:
                state.update(ema_decay=self.ema.decay, ema_updates=self.ema.updates)
                tensors = {RAW_WEIGHTS_FILE: {n: v.detach().to("cpu").contiguous()
                                              for n, v in self.model.state_dict().items()}}
            try:
                ckpt.save_checkpoint(directory, self.eval_model(), self.tokenizer, self.optimizer, state,
                                     provenance=self.task.provenance(self.step), tensors=tensors)
            except ckpt.CheckpointError as error:  # the run's progress up to its last saved step is what is kept
                last = (f"the one {self.layout.latest} names is intact, and `--resume` continues from it"
                        if self.layout.latest.is_file() else "none was saved before")
                raise ckpt.CheckpointError(f"{error}. {self.task.name} stopped at step {self.step}; of its earlier "
                                           f"checkpoints {last}") from error
            ckpt.write_latest(self.layout.root, directory, self.step)
            ckpt.prune_checkpoints(self.layout.root, self.config.keep_checkpoints, keep=directory)
            self.checkpoint = directory
        self.info.barrier()

    # -- the loop -------------------------------------------------------------------------------------------

    def _train_step(self, window: _Window) -> Tuple[float, float]:
        """One optimizer step (all micro-batches); returns (lr, gradient norm)."""
        config, info = self.config, self.info
        lr = warmup_cosine_lr(self.step, self.steps, self.peak_lr, config.warmup_steps, config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # optimizer states saved before lr_scale lack it
        step_stats = {"train_loss": 0.0}
        for micro in range(config.grad_accum):
            first = (micro * info.world + info.rank) * config.batch_size
            sync = micro == config.grad_accum - 1 or not info.enabled
            with (contextlib.nullcontext() if sync else self.forward.no_sync()), self.autocast():
                loss, stats = self.task.loss(self.forward, self.step, first)
                loss = loss / config.grad_accum
            loss.backward()
            step_stats["train_loss"] += loss.item()
            for name, value in stats.items():
                step_stats[name] = step_stats.get(name, 0.0) + value / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip).item()
        if not (math.isfinite(step_stats["train_loss"]) and math.isfinite(grad_norm)):
            raise TrainingError(f"{self.task.name}: non-finite loss at step {self.step + 1} (loss "
                                f"{step_stats['train_loss']}, gradient norm {grad_norm}); stopped before applying or "
                                "saving it. Lower --lr, or check the data")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        window.add(step_stats)
        return lr, grad_norm

    def _log_window(self, window: _Window, lr, grad_norm, bar):
        means = window.means(self.info, self.device)
        elapsed = time.perf_counter() - window.start
        record = {"step": self.step, "train_loss": means.pop("train_loss"), "lr": lr, "grad_norm": grad_norm,
                  **means, self.task.unit: self.step * self.task.units_per_step,
                  f"{self.task.unit}_per_s": window.steps * self.task.units_per_step / elapsed}
        self.record(record)
        shown = {short: f"{record[name]:.3f}" for short, name in self.task.bar_stats.items()}
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", **shown, lr=f"{lr:.2e}")

    def record(self, record: Dict):
        self.metrics.log(record)
        self.last.update({key: value for key, value in record.items() if key != "step"})

    def run(self) -> bool:
        """Train from self.step to stop_at; returns True when the task ended the run early (e.g. a plateau)."""
        from tqdm import tqdm

        info = self.info
        if info.main:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.layout.checkpoints)
            ckpt.remove_stale_temporaries(self.layout.root)
        info.barrier()
        self.metrics = MetricsLog(self.layout, info.main, self.config.tensorboard, self.step)
        bar = tqdm(total=self.steps, initial=self.step, disable=not (self.config.progress and info.main),
                   desc=self.task.name, unit="step", dynamic_ncols=True)
        self.model.train()
        if self.step == 0:
            self.record(self.task.evaluate(0, "start", self.eval_model())[0])
        window, stopped, saved_at = _Window(), False, self.step
        with _stop_requests(enabled=not info.enabled) as requests:
            while self.step < self.stop_at:
                lr, grad_norm = self._train_step(window)
                bar.update(1)
                if self.step % self.config.log_interval == 0 or self.step == self.stop_at:
                    self._log_window(window, lr, grad_norm, bar)
                    window = _Window()
                final = self.step == self.steps
                if final or self.step % self.config.eval_interval == 0:
                    record, stopped = self.task.evaluate(self.step, "end" if final else "interval", self.eval_model())
                    self.record(record)
                    final = final or stopped
                if final or self.step % self.config.save_interval == 0 or self.step == self.stop_at:
                    self.save()
                    saved_at = self.step
                if final:
                    break
                if requests:  # Ctrl-C or SIGTERM: keep the progress, then stop
                    if saved_at != self.step:
                        self.save()
                    bar.close()
                    self.metrics.close()
                    raise KeyboardInterrupt(f"checkpoint at step {self.step} in {self.layout.root}: continue the "
                                            "run with --resume")
        bar.close()
        self.metrics.close()
        return stopped


@contextlib.contextmanager
def _stop_requests(enabled: bool):
    """A list that SIGINT (Ctrl-C) and SIGTERM append to, instead of stopping the process in the middle of a step.

    The loop checks it between steps, saves a checkpoint and stops, so an interrupted run loses no finished step. A
    second signal stops at once. Off (the default handlers stay) outside the main thread and under DDP, where the
    ranks could see the request at different steps and one would wait for the others' collectives forever.
    """
    requests = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def request(signum, frame):
        if requests:
            raise KeyboardInterrupt
        requests.append(signum)

    previous = {number: signal.signal(number, request) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


__all__ = ["DistInfo", "EMA", "RAW_WEIGHTS_FILE", "Trainer", "TrainingError", "TrainingTask", "check_loop_options",
           "distributed", "loop_option", "param_groups", "warn_changed_settings", "warmup_cosine_lr"]
