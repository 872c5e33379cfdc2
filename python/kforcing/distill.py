"""Progressive self-forcing distillation: AR teacher -> k=1 -> k=2 -> k=4 students (`kforcing distill`).

    kforcing distill --teacher runs/teacher --schedule 1,2,4 --out runs/student
    torchrun --nproc_per_node 8 -m kforcing.cli distill --teacher runs/teacher --out runs/student

The method is METHOD.md section 5. The targets are always the teacher's own outputs under the very noise the
student sees; data tokens only provide contexts.

Stage k = 1 (teacher = the AR model). For a context batch ids (B, N), every position t is the anchor of a window
with one uniform u_t and the sequence's temperature tau. The target of window t is the teacher's inverse-CDF token

    y_t = min { v : sum_{v' <= v} softmax(logits_t / tau)_v' >= u_t }          (`ar_targets`)

computed with a float64 CDF (`kforcing_ops.reference.inverse_cdf_sample` on float64 logits). The student
(`PushForwardLM.from_teacher`) starts from the teacher's weights; only the noise encoder is new.

Stage k -> 2k (teacher = the frozen stage-k student). Each window draws 2k uniforms. The teacher produces its
tokens 1..k by one staircase pass with (u_1..u_k) and argmax; then tokens k+1..2k by a second pass with window size
2k, in which its own first k tokens are token rows and (u_{k+1}..u_{2k}) the hints (`self_forcing_targets`). That is
exactly two consecutive decode steps of the teacher on its own outputs (`generate_kforcing` with k tokens per pass),
for every window in parallel. The student has max_k = 2k and starts from the teacher.

Loss: cross-entropy of the student's logits at every hint row against its target. Per window offset the loss and
the accuracy are logged, and the whole-window exact match.

Baseline (`objective="noise-inversion"`): data tokens are the targets, and each u_j is drawn inside the data token's
CDF interval under the AR teacher at tau (`noise_inversion_batch`), for every stage. The paper reports that this
suffers from a train/inference mismatch (at inference the student conditions on its own tokens, never on data) and
from numerical fragility (a token of tiny probability has an interval float64 can barely hit); the fraction of
windows whose u really maps back to the data token is logged as `inversion_valid`.

Optimisation, per stage: AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on GPU (the
teacher passes that make targets always run in float32: the tokens must be the teacher's decode-time tokens), and
an exponential moving average of the student's weights, which is what is evaluated, exported and used as the
next stage's teacher. The EMA's decay ramps up as min(ema_decay, (1 + n) / (10 + n)) after n updates, so that short
stages are not dominated by the initial weights.

Noise and data are counter-based (`kforcing.noise`): batch `step` of stage s is a pure function of (seed, s, step,
sample index), so resuming mid-stage continues exactly (N steps straight = N/2 + resume + N/2), and any number of
DDP ranks sees the same global batch.

Run directory (OUT):

    distill.json                  the settings of the run (checked on --resume)
    tokenizer.json                the teacher's tokenizer
    stage_k1/ metrics.jsonl       per-stage metrics: training lines every log_interval steps, validation lines
              checkpoints/step_N  training checkpoints: model.safetensors holds the EMA weights (the export),
                                  trainer_state.pt the raw weights, the step and the plateau history,
                                  optimizer.pt the optimizer
              latest.json         the newest training checkpoint
              final/              the stage's exported student (EMA weights), and done.json its summary
    stage_k2/ ...
    latest.json                   points to the last finished stage's final/: `kforcing sample --ckpt OUT`,
                                  `kforcing eval --student OUT` use it

Steps per stage are fixed (`steps`), or with `plateau_patience` a stage also ends early when the validation
exact match (against the stage's targets) has not improved by `plateau_delta` over the last `plateau_patience`
evaluations. The cosine schedule always spans `steps`.
"""

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from kforcing_ops import reference as _reference

from . import checkpoint as ckpt
from .data import TokenDataset, Tokenizer, prepare_dataset
from .model import ARModel, PushForwardLM
from .noise import counter_uniform
from .train import (_Dist, _Metrics, _all_mean, _init_distributed, _prune, _resolve_device, _rng_state,
                    _set_rng_state, _trim_metrics, param_groups, warmup_cosine_lr)

OBJECTIVES = ("self-forcing", "noise-inversion")
RUN_FILE = "distill.json"
DONE_FILE = "done.json"

# Seeds of the counter-based streams (XORed with the run's seed): training noise, temperatures, validation.
_NOISE_KEY = 0x6B66_0001
_TAU_KEY = 0x6B66_0002
_VAL_OFFSET = 1 << 40  # sample keys of validation batches start here (training keys stay far below)


class DistillError(ValueError):
    """The settings of a distillation (or the checkpoints it is given) cannot work together."""


# ---------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class DistillConfig:
    """Everything a distillation run needs; `kforcing distill --help` documents each flag.

    Attributes (the less obvious ones):
        teacher: the AR teacher: a checkpoint directory or a `train-teacher` run directory. A K-Forcing student
            checkpoint with max_k = m also works, to continue a schedule that starts at 2m.
        schedule: the students' max_k, in order: 1, 2, 4, ... (each stage doubles k; noise-inversion only needs
            an increasing schedule).
        steps: optimizer steps per stage: one value for every stage or one per stage.
        seq_len: context tokens N per sequence (each has N windows); default: the teacher's training length, at
            most max_seq_len - max(schedule) so that every window's tokens fit the model's positions.
        tau: (min, max): each sequence's temperature is drawn uniformly from this range; (1, 1) fixes it.
        corpus / data_dir: where contexts come from; default: the teacher's own token cache (or its corpus).
        lr: peak learning rate; default 1e-3 for models up to 256 wide, 3e-4 above.
        plateau_patience: None, or end a stage early after this many evaluations without a gain of plateau_delta
            in validation exact match (and after min_steps).
        ar_eval_contexts: held-out contexts for the coupled agreement with the AR teacher, logged at the start and
            the end of every stage (0 disables it).
        stop_after: stop (with a checkpoint) after this many optimizer steps in total, counted over all stages.
    """

    teacher: str
    out_dir: str
    schedule: List[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    objective: str = "self-forcing"
    steps: List[int] = dataclasses.field(default_factory=lambda: [1000])
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: Optional[int] = None
    tau: Tuple[float, float] = (1.0, 1.0)
    lr: Optional[float] = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    noise_lr_scale: float = 1.0
    plateau_patience: Optional[int] = None
    plateau_delta: float = 0.005
    min_steps: int = 0
    corpus: Optional[List[str]] = None
    text_field: str = "text"
    corpus_max_bytes: Optional[int] = None
    data_dir: Optional[str] = None
    val_fraction: float = 0.01
    eval_interval: int = 200
    eval_batches: int = 8
    ar_eval_contexts: int = 128
    save_interval: int = 500
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
        if self.objective not in OBJECTIVES:
            raise DistillError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        check_schedule(self.schedule, self.objective, start=None)
        self.stage_steps()  # validates steps
        positive = ("batch_size", "grad_accum", "eval_interval", "eval_batches", "save_interval", "log_interval",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise DistillError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "min_steps", "ar_eval_contexts"):
            if getattr(self, name) < 0:
                raise DistillError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise DistillError(f"seq_len must be >= 1, got {self.seq_len}")
        low, high = self.tau
        if not (0.0 < low <= high < math.inf):
            raise DistillError(f"tau range must satisfy 0 < min <= max, got {low}..{high}")
        if not self.noise_lr_scale > 0.0:
            raise DistillError(f"noise_lr_scale must be > 0, got {self.noise_lr_scale}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DistillError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.plateau_patience is not None and self.plateau_patience < 1:
            raise DistillError(f"plateau_patience must be >= 1 (or None), got {self.plateau_patience}")
        if self.stop_after is not None and not 1 <= self.stop_after <= sum(self.stage_steps()):
            raise DistillError(f"stop_after must be in [1, {sum(self.stage_steps())}] (steps of all stages), "
                               f"got {self.stop_after}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise DistillError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise DistillError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def stage_steps(self) -> List[int]:
        """Steps of each stage (one value repeated, or one per stage)."""
        steps = list(self.steps)
        if len(steps) == 1:
            steps = steps * len(self.schedule)
        if len(steps) != len(self.schedule):
            raise DistillError(f"steps has {len(steps)} values for {len(self.schedule)} stages "
                               f"(schedule {self.schedule}): give one value or one per stage")
        if any(not isinstance(s, int) or s < 1 for s in steps):
            raise DistillError(f"steps per stage must be positive ints, got {steps}")
        return steps

    def effective_lr(self, model_config):
        if self.lr is not None:
            return self.lr
        return 1e-3 if model_config.n_embd <= 256 else 3e-4


def check_schedule(schedule: Sequence[int], objective: str = "self-forcing", start: Optional[int] = 1):
    """Raise DistillError unless `schedule` is a valid list of stage sizes k.

    Self-forcing builds stage 2k's targets from two k-token steps of the stage-k student, so the schedule must start
    at `start` (1 from an AR teacher, 2m from a student with max_k m) and double at every stage: 1,2,4,8.
    Noise-inversion targets come from data, so any strictly increasing schedule starting at >= start works.
    start=None skips the check of the first stage (the teacher is not known yet).
    """
    if not schedule or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in schedule):
        raise DistillError(f"schedule must be a non-empty list of positive ints such as 1,2,4, got {schedule!r}")
    if objective == "self-forcing":
        if start is not None and schedule[0] != start:
            what = "an AR teacher" if start == 1 else f"a teacher student with max_k={start // 2}"
            raise DistillError(f"schedule {list(schedule)} must start at k={start} for {what} (self-forcing builds "
                               f"each stage from the previous one)")
        for a, b in zip(schedule, schedule[1:]):
            if b != 2 * a:
                raise DistillError(f"schedule {list(schedule)} does not double: after k={a} comes k={b}, but "
                                   f"self-forcing stage k -> 2k needs {2 * a} (e.g. 1,2,4)")
    else:
        if start is not None and schedule[0] < start:
            raise DistillError(f"schedule {list(schedule)} must start at k >= {start}")
        for a, b in zip(schedule, schedule[1:]):
            if b <= a:
                raise DistillError(f"schedule {list(schedule)} must increase, got k={a} then k={b}")


def parse_int_list(text: str, name: str) -> List[int]:
    """'1,2,4' -> [1, 2, 4], with a clear error naming the option."""
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise DistillError(f"{name} must be comma-separated integers such as 1,2,4, got {text!r}") from None
    if not values:
        raise DistillError(f"{name} is empty")
    return values


def parse_tau(text: str) -> Tuple[float, float]:
    """'1.0' -> (1.0, 1.0); '0.7:1.2' -> (0.7, 1.2)."""
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError:
        raise DistillError(f"--tau must be a temperature such as 1.0 or a range such as 0.7:1.2, got {text!r}") \
            from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise DistillError(f"--tau must be T or MIN:MAX, got {text!r}")
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------------------
# Targets


def _flat_tau(tau, batch, rows_per_sequence, device):
    """tau as one float64 value per row of (batch * rows_per_sequence), or a float."""
    if not isinstance(tau, torch.Tensor):
        return float(tau)
    tau = tau.to(device=device, dtype=torch.float64).reshape(-1)
    if tau.numel() == 1:
        return float(tau.item())
    if tau.shape[0] != batch:
        raise ValueError(f"`tau` must be a float or a (B,) tensor with B={batch}, got shape {tuple(tau.shape)}")
    return tau.repeat_interleave(rows_per_sequence)


@torch.no_grad()
def ar_targets(teacher: ARModel, ids: torch.Tensor, u: torch.Tensor, tau) -> torch.Tensor:
    """Stage 1 targets: the AR teacher's inverse-CDF token after every context position, at temperature tau.

    Args:
        teacher: the AR model (its logits are computed in float32, autocast off).
        ids: (B, N) context tokens.
        u: (B, W, 1) uniforms, W <= N windows: window t is anchored at context position t.
        tau: a float or a (B,) tensor: the temperature of each sequence.

    Returns:
        (B, W, 1) int64: reference.inverse_cdf_sample(float64 logits at t, u[:, t, 0], tau), i.e. the token the
        teacher samples at position t+1 with the uniform u (smallest v whose float64 CDF reaches u).
    """
    if not isinstance(teacher, ARModel):
        raise TypeError(f"ar_targets needs an ARModel teacher, got {type(teacher).__name__}")
    if u.dim() != 3 or u.shape[2] != 1 or u.shape[0] != ids.shape[0] or u.shape[1] > ids.shape[1]:
        raise ValueError(f"`u` must be (B, W, 1) with B={ids.shape[0]} and W <= N={ids.shape[1]}, "
                         f"got {tuple(u.shape)}")
    batch, windows = u.shape[:2]
    with _no_autocast(ids.device):
        logits = teacher(ids)[:, :windows]
    flat = logits.reshape(batch * windows, -1).double()
    temperature = _flat_tau(tau, batch, windows, ids.device)
    tokens = _reference.inverse_cdf_sample(flat, u.reshape(-1).double().contiguous(), temperature)
    return tokens.view(batch, windows, 1)


@torch.no_grad()
def self_forcing_targets(teacher: PushForwardLM, ids: torch.Tensor, u: torch.Tensor, tau) -> torch.Tensor:
    """Stage k -> 2k targets: two consecutive K-Forcing decode steps of the stage-k teacher, for every window.

    Args:
        teacher: the frozen stage-k student (a PushForwardLM with max_k >= k; run in float32, autocast off).
        ids: (B, N) context tokens.
        u: (B, W, 2k) uniforms: u[:, t, :k] for the teacher's first step from window t, u[:, t, k:] for its second.
        tau: a float or a (B,) tensor.

    Returns:
        (B, W, 2k) int64. Tokens 0..k-1 = argmax of a staircase pass with u[..., :k]; tokens k..2k-1 = argmax of
        a pass with window size 2k whose first k rows are those tokens (at positions t+1..t+k) and whose k hints
        carry u[..., k:]. That is `generate_kforcing(teacher, ids[b, :t+1], 2k, k=k)` for window t when its
        uniforms are u[b, t] (tested token for token); like decoding, the argmax is taken over float32 logits.
    """
    if not isinstance(teacher, PushForwardLM):
        raise TypeError(f"self_forcing_targets needs a PushForwardLM teacher, got {type(teacher).__name__}")
    if u.dim() != 3 or u.shape[2] % 2 or u.shape[0] != ids.shape[0]:
        raise ValueError(f"`u` must be (B, W, 2k) with B={ids.shape[0]}, got {tuple(u.shape)}")
    k = u.shape[2] // 2
    if k > teacher.max_k:
        raise ValueError(f"2k = {2 * k} uniforms per window need a teacher with max_k >= {k}, "
                         f"this one has max_k={teacher.max_k}")
    with _no_autocast(ids.device):
        first = teacher.forward_train(ids, u[..., :k], tau).float().argmax(-1)
        second = teacher.forward_train(ids, u[..., k:], tau, window_size=2 * k, window_tokens=first)
    return torch.cat([first, second.float().argmax(-1)], dim=2)


@torch.no_grad()
def noise_inversion_batch(teacher: ARModel, tokens: torch.Tensor, v: torch.Tensor, tau):
    """The noise-inversion baseline: data tokens as targets, u drawn inside their CDF interval under the teacher.

    Args:
        teacher: the AR model.
        tokens: (B, N + K) data tokens: context x_0..x_{N-1} and K more, so that window t targets x_{t+1..t+K}.
        v: (B, N, K) uniforms in [0, 1) that place each u inside its interval.
        tau: a float or a (B,) tensor.

    Returns:
        (ids (B, N), u (B, N, K) float64, targets (B, N, K) int64, valid (B, N, K) bool). For target y at position
        p the teacher's float64 CDF under x_{<p} at tau gives the interval (C(y-1), C(y)], and
        u = C(y-1) + v * (C(y) - C(y-1)), clamped into the interval. `valid` says whether u maps back to y under
        the exact inverse-CDF rule: a token whose probability is below float64 resolution next to its CDF cannot be
        hit, which is the numerical fragility the paper reports.
    """
    if not isinstance(teacher, ARModel):
        raise TypeError(f"noise_inversion_batch needs an ARModel teacher, got {type(teacher).__name__}")
    batch, windows, k = v.shape
    if tokens.shape != (batch, windows + k):
        raise ValueError(f"`tokens` must be (B, N + K) = ({batch}, {windows + k}), got {tuple(tokens.shape)}")
    with _no_autocast(tokens.device):
        logits = teacher(tokens[:, :-1]).double()  # (B, N + K - 1, V): position p predicts p + 1
    temperature = _flat_tau(tau, batch, 1, tokens.device)
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.view(batch, 1, 1)
    else:
        logits = logits / temperature
    # Window t, offset j targets the token at t + 1 + j, predicted by the logits at t + j.
    index = torch.arange(windows, device=tokens.device)[:, None] + torch.arange(k, device=tokens.device)
    targets = tokens[:, 1:][:, index]  # (B, N, K)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # the reference's float64 CDF
    cdf_windows = cdf[:, index]  # (B, N, K, V)
    upper = cdf_windows.gather(-1, targets[..., None]).squeeze(-1)
    below = (targets - 1).clamp(min=0)
    lower = torch.where(targets > 0, cdf_windows.gather(-1, below[..., None]).squeeze(-1),
                        torch.zeros_like(upper))
    u = lower + v.double() * (upper - lower)
    u = torch.minimum(torch.maximum(u, torch.nextafter(lower, torch.ones_like(lower))), upper).clamp(0.0, 1.0)
    sampled = _reference.inverse_cdf_sample(logits[:, index].reshape(-1, logits.shape[-1]),
                                            u.reshape(-1).contiguous())
    valid = sampled.view_as(targets) == targets
    return tokens[:, :windows], u, targets, valid


@contextlib.contextmanager
def _no_autocast(device):
    with torch.autocast(device.type if isinstance(device, torch.device) else str(device), enabled=False):
        yield


# ---------------------------------------------------------------------------------------------------------
# Noise of the training batches


def batch_noise(seed, stage, sample_keys, windows, k, tau_range):
    """(u (B, windows, k) float64, tau (B,) float32) of the samples `sample_keys` (B,) int64 in stage `stage`.

    u[b, t, j] = counter_uniform(seed ^ NOISE ^ stage, sample_keys[b], t * k + j); tau from its own stream,
    uniform in tau_range. A pure function of its arguments: exact resumption and DDP need nothing else.
    """
    device = sample_keys.device
    stream = (seed ^ _NOISE_KEY) + (stage << 20)
    position = (torch.arange(windows, device=device)[:, None] * k + torch.arange(k, device=device))[None]
    u = counter_uniform(stream, sample_keys[:, None, None], position)
    low, high = tau_range
    if low == high:
        tau = torch.full((len(sample_keys),), float(low), dtype=torch.float32, device=device)
    else:
        r = counter_uniform((seed ^ _TAU_KEY) + (stage << 20), sample_keys, 0)
        tau = (low + (high - low) * r).to(torch.float32)
    return u, tau


# ---------------------------------------------------------------------------------------------------------
# EMA


class EMA:
    """An exponential moving average of a model's floating-point parameters and buffers, in float32.

    decay after n updates: min(decay, (1 + n) / (10 + n)). `copy_to(model)` writes the averages into a model.
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
# Loss and metrics


def window_loss(logits: torch.Tensor, targets: torch.Tensor):
    """(mean loss, per-offset loss (K,), per-offset accuracy (K,), exact match) of hint logits (B, W, K, V)."""
    per_token = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none")
    per_token = per_token.view(targets.shape)
    correct = logits.detach().float().argmax(-1) == targets
    return (per_token.mean(), per_token.detach().mean(dim=(0, 1)), correct.float().mean(dim=(0, 1)),
            correct.all(dim=-1).float().mean())


class _StudentForward(nn.Module):
    """forward() = student.forward_train, so that DistributedDataParallel sees the training call."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, ids, u, tau):
        return self.student.forward_train(ids, u, tau)


# ---------------------------------------------------------------------------------------------------------
# The run


def _teacher_run_dir(teacher_path: Path) -> Optional[Path]:
    """The run directory of a checkpoint (RUN/checkpoints/step_N -> RUN), or the path itself when it is a run."""
    if (teacher_path / ckpt.LATEST).is_file():
        return teacher_path
    directory = ckpt.resolve_checkpoint(teacher_path)
    run = directory.parent.parent
    return run if (run / ckpt.LATEST).is_file() else None


def _load_data(config: DistillConfig, teacher_dir: Path, teacher_config: dict, tokenizer: Optional[Tokenizer],
               out: Path, info: _Dist) -> TokenDataset:
    """The token dataset contexts come from (see DistillConfig.corpus / data_dir)."""
    train = teacher_config.get("extra", {}).get("train", {})
    if tokenizer is None:
        raise DistillError(f"teacher checkpoint {teacher_dir} has no tokenizer.json: the contexts cannot be tokenised "
                           "(and the students would have no tokenizer)")
    if config.data_dir is None and config.corpus is None:
        run = _teacher_run_dir(Path(config.teacher).expanduser())
        candidates = []
        if teacher_config.get("extra", {}).get("data_dir"):  # a student teacher: the cache it was distilled on
            candidates.append(Path(teacher_config["extra"]["data_dir"]))
        if train.get("data_dir"):
            candidates.append(Path(train["data_dir"]))
        if run is not None:
            candidates.append(run / "data")
        for candidate in candidates:
            meta = candidate / "meta.json"
            if meta.is_file():
                try:
                    fingerprint = json.loads(meta.read_text()).get("tokenizer_fingerprint")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if fingerprint == tokenizer.fingerprint():
                    return TokenDataset(candidate, verify=False)
    corpus = config.corpus or train.get("corpus")
    if not corpus:
        raise DistillError(f"cannot find the teacher's training data next to {config.teacher}; pass --corpus "
                           "(e.g. --corpus stdlib) to draw contexts from a corpus")
    data_dir = Path(config.data_dir) if config.data_dir else out / "data"
    max_bytes = config.corpus_max_bytes if config.corpus else train.get("corpus_max_bytes")
    text_field = config.text_field if config.corpus else train.get("text_field", config.text_field)
    val_fraction = config.val_fraction if config.corpus else train.get("val_fraction", config.val_fraction)
    if info.main:
        dataset = prepare_dataset(corpus, tokenizer, data_dir, val_fraction, text_field, max_bytes,
                                  progress=config.progress)
    info.barrier()
    if not info.main:
        dataset = prepare_dataset(corpus, tokenizer, data_dir, val_fraction, text_field, max_bytes, verify=False)
    return dataset


_TRAJECTORY_FIELDS = ("objective", "steps", "batch_size", "grad_accum", "seq_len", "tau", "lr", "min_lr_ratio",
                      "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "ema_decay", "plateau_patience",
                      "plateau_delta", "min_steps", "corpus", "seed", "dtype")


def _json_config(config: DistillConfig) -> dict:
    data = dataclasses.asdict(config)
    data["tau"] = list(data["tau"])
    return data


def distill(config: DistillConfig) -> dict:
    """Run (or resume) a progressive distillation; returns a summary.

    The summary: {"stages": [per-stage summaries (k, steps, final checkpoint, val metrics, AR agreement)],
    "checkpoint": the final student's directory, "out_dir"}.

    Raises DistillError / ValueError for bad settings, kforcing.checkpoint.CheckpointError for missing or unfitting
    checkpoints, kforcing.data errors for data problems.
    """
    config.validate()
    info = _init_distributed(config.device if config.device != "auto" else
                             ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return _distill(config, info)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _distill(config: DistillConfig, info: _Dist) -> dict:
    device = _resolve_device(config.device, info)
    out = Path(config.out_dir)
    run_file = out / RUN_FILE
    if run_file.is_file() and not config.resume:
        raise DistillError(f"{out} already holds a distillation run; pass --resume to continue it (finished stages "
                           "are kept), or choose another --out")

    teacher, tokenizer, teacher_config = ckpt.load_model(config.teacher, device=device)
    teacher_dir = ckpt.resolve_checkpoint(config.teacher)
    if isinstance(teacher, PushForwardLM):
        start = 2 * teacher.max_k if config.objective == "self-forcing" else teacher.max_k + 1
    else:
        start = 1
    check_schedule(config.schedule, config.objective, start)
    if isinstance(teacher, PushForwardLM) and config.objective == "noise-inversion":
        raise DistillError("--objective noise-inversion needs an AR teacher (the CDF intervals are the AR model's); "
                           f"{teacher_dir} is a K-Forcing student")
    max_k = max(config.schedule)
    model_config = teacher.config
    seq_len = config.seq_len or teacher_config.get("extra", {}).get("train", {}).get("seq_len") \
        or model_config.max_seq_len
    seq_len = min(seq_len, model_config.max_seq_len - max_k) if config.seq_len is None else seq_len
    if seq_len < 1 or seq_len + max_k > model_config.max_seq_len:
        raise DistillError(f"seq_len={seq_len} + max k={max_k} exceeds the teacher's max_seq_len="
                           f"{model_config.max_seq_len}: every window's tokens must fit the model's positions")

    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        if run_file.is_file():
            saved = json.loads(run_file.read_text())
            current = _json_config(config)
            changed = [f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in _TRAJECTORY_FIELDS
                       if key in saved and saved[key] != current[key]]
            if saved.get("teacher_checkpoint") not in (None, str(teacher_dir.resolve())):
                raise DistillError(f"{out} was distilled from {saved['teacher_checkpoint']}, not {teacher_dir}; "
                                   "resume with the original --teacher or choose another --out")
            if changed:
                print("kforcing: resuming with changed settings (" + "; ".join(changed) + "): the run will differ "
                      "from one that never stopped", file=sys.stderr)
        ckpt._write_json(run_file, {**_json_config(config), "teacher_checkpoint": str(teacher_dir.resolve()),
                                    "seq_len_used": seq_len})
        if tokenizer is not None:
            tokenizer.save(out / "tokenizer.json")
    info.barrier()
    dataset = _load_data(config, teacher_dir, teacher_config, tokenizer, out, info)
    if dataset.vocab_size > model_config.vocab_size:
        raise DistillError(f"the data's tokenizer has {dataset.vocab_size} tokens but the teacher's vocabulary has "
                           f"{model_config.vocab_size}: the corpus was tokenised with another tokenizer")

    ar_teacher = teacher if isinstance(teacher, ARModel) else None
    stage_teacher = teacher
    summaries = []
    steps_before = 0
    stage_steps = config.stage_steps()

    for index, k in enumerate(config.schedule):
        stage_dir = out / f"stage_k{k}"
        done = stage_dir / DONE_FILE
        if done.is_file():
            summary = json.loads(done.read_text())
            final = stage_dir / "final"
            if not (final / "config.json").is_file():
                raise ckpt.CheckpointError(f"{done} marks stage k={k} finished but {final} is not a checkpoint; "
                                           f"delete {stage_dir} to redo the stage")
            summaries.append(summary)
            steps_before += summary["steps_budget"]
            stage_teacher, _, _ = ckpt.load_model(final, device=device, with_tokenizer=False)
            if info.main:
                ckpt.write_latest(out, final, summary["step"])
            continue
        if config.stop_after is not None and steps_before >= config.stop_after:
            break
        summary = _run_stage(config, info, device, index, k, stage_steps[index], stage_dir, stage_teacher,
                             ar_teacher, dataset, tokenizer, seq_len, steps_before)
        steps_before += stage_steps[index]
        if summary is None:  # stopped mid-stage (stop_after)
            break
        summaries.append(summary)
        stage_teacher, _, _ = ckpt.load_model(stage_dir / "final", device=device, with_tokenizer=False)
        if info.main:
            ckpt.write_latest(out, stage_dir / "final", summary["step"])
        info.barrier()
    final = None
    if summaries and len(summaries) == len(config.schedule):
        final = str(out / f"stage_k{config.schedule[-1]}" / "final")
    return {"stages": summaries, "checkpoint": final, "out_dir": str(out), "seq_len": seq_len}


def _run_stage(config: DistillConfig, info: _Dist, device, index, k, steps, stage_dir: Path, teacher,
               ar_teacher, dataset: TokenDataset, tokenizer, seq_len, steps_before):
    """Train one stage; returns its summary, or None when stop_after ended the run inside it."""
    from tqdm import tqdm

    from .evaluate import coupled_agreement, heldout_contexts

    objective = config.objective
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if ar_teacher is not None:
        for p in ar_teacher.parameters():
            p.requires_grad_(False)
    # The stage teacher's k (what it decodes per pass) and the uniforms per window.
    hints = k
    if objective == "self-forcing" and isinstance(teacher, PushForwardLM):
        teacher_k = k // 2
        if teacher.max_k < teacher_k:
            raise DistillError(f"stage k={k} needs a teacher with max_k >= {teacher_k}, got max_k={teacher.max_k}")
    elif objective == "self-forcing" and k != 1:
        raise DistillError(f"self-forcing stage k={k} needs a K-Forcing teacher; an AR teacher only starts k=1")

    torch.manual_seed(config.seed + 7919 * index)  # the same new noise encoder on every rank
    student = PushForwardLM.from_teacher(teacher, k).to(device)
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    ema = EMA(student, config.ema_decay)
    export = PushForwardLM.from_teacher(teacher, k).to(device).eval()  # holds the EMA weights
    for p in export.parameters():
        p.requires_grad_(False)
    peak = config.effective_lr(student.config)
    groups = param_groups(student, config.weight_decay, scaled_prefix="noise.", lr_scale=config.noise_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=peak,
                                  betas=(config.beta1, config.beta2), fused=device.type == "cuda")

    torch.manual_seed(config.seed + 7919 * index + 1000003 * info.rank)  # per-rank dropout streams, if any
    latest = stage_dir / ckpt.LATEST
    start_step, history, initial = 0, [], None
    if latest.is_file():
        if not config.resume:
            raise DistillError(f"{stage_dir} holds a training checkpoint; pass --resume to continue it")
        directory = ckpt.resolve_checkpoint(stage_dir)
        ckpt.load_weights(export, directory)  # the EMA weights
        state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
        if state["world_size"] != info.world:
            raise ckpt.CheckpointError(f"the checkpoint {directory} was written by {state['world_size']} process(es) "
                                       f"but this run has {info.world}; exact resumption needs the same world size")
        student.load_state_dict(load_file(str(directory / "student.safetensors"), device=str(device)))
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
        ema.load_state_dict({"decay": state["ema_decay"], "updates": state["ema_updates"],
                             "shadow": {n: v.float() for n, v in export.state_dict().items()
                                        if v.is_floating_point()}})
        start_step, history, initial = state["step"], list(state["history"]), state.get("initial")
        _set_rng_state(state["rng"][info.rank], device)
    elif info.main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    info.barrier()

    train_model = _StudentForward(student)
    if config.compile:
        train_model = torch.compile(train_model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    metrics = _Metrics(stage_dir, info.main, config.tensorboard)
    if info.main and start_step:
        _trim_metrics(metrics.path, start_step)
    elif info.main and metrics.path.exists():
        metrics.path.unlink()

    global_batch = config.batch_size * config.grad_accum * info.world
    data_len = seq_len + hints - 1 if objective == "noise-inversion" else seq_len
    data_seed = config.seed + 104729 * (index + 1)

    def make_batch(split, step, first, batch_keys, model_teacher):
        """(ids, u, tau, targets, valid fraction or None) of one micro-batch."""
        x, y = dataset.batch(split, step, len(batch_keys), data_len, data_seed, first_index=first, device=device)
        u, tau = batch_noise(config.seed, index, batch_keys, seq_len, hints, config.tau)
        if objective == "noise-inversion":
            tokens = torch.cat([x, y[:, -1:]], dim=1)
            ids, u, targets, valid = noise_inversion_batch(ar_teacher, tokens, u, tau)
            return ids, u, tau, targets, valid.float().mean()
        ids = x
        if isinstance(model_teacher, ARModel):
            targets = ar_targets(model_teacher, ids, u, tau)
        else:
            targets = self_forcing_targets(model_teacher, ids, u, tau)
        return ids, u, tau, targets, None

    summary = {"k": k, "objective": objective, "steps_budget": steps, "seq_len": seq_len, "global_batch": global_batch,
               "lr": peak, "teacher_max_k": getattr(teacher, "max_k", 0)}
    contexts = []
    if ar_teacher is not None and config.ar_eval_contexts:
        contexts = heldout_contexts(dataset, config.ar_eval_contexts, max_len=min(seq_len, student.config.max_seq_len
                                                                                  - k), seed=config.seed)

    def validate(step):
        """Validation loss/accuracy against the stage's targets (EMA weights), all ranks."""
        ema.copy_to(export)
        total = torch.zeros(3 + 2 * hints, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(info.rank, config.eval_batches, info.world):
                keys = _VAL_OFFSET + i * config.batch_size + torch.arange(config.batch_size, device=device)
                ids, u, tau, targets, valid = make_batch("val", i, i * config.batch_size, keys, teacher)
                with autocast:
                    logits = export.forward_train(ids, u, tau)
                loss, offset_loss, offset_acc, exact = window_loss(logits, targets)
                total += torch.cat([torch.stack([loss.double(), exact.double(), torch.ones((), device=device,
                                                                                             dtype=torch.float64)]),
                                    offset_loss.double(), offset_acc.double()])
        if info.enabled:
            dist.all_reduce(total)
        n = total[2].item()
        record = {"step": step, "val_loss": total[0].item() / n, "val_exact_match": total[1].item() / n}
        for j in range(hints):
            record[f"val_loss_{j + 1}"] = total[3 + j].item() / n
            record[f"val_acc_{j + 1}"] = total[3 + hints + j].item() / n
        return record

    def ar_agreement(step):
        if not contexts or not info.main:
            return {}
        ema.copy_to(export)
        # The same contexts and uniforms in every stage: a stage starts where the previous one ended.
        result = coupled_agreement(ar_teacher, export, contexts, k, seed=config.seed,
                                   temperature=_mid_tau(config.tau))
        record = {"ar_exact_match": result["exact_match"]}
        for j, value in enumerate(result["per_offset"]):
            record[f"ar_agree_{j + 1}"] = value
        return record

    def evaluate(step, with_ar):
        record = validate(step)
        if with_ar:
            record.update(ar_agreement(step))
        metrics.log(record)
        summary.update({key: value for key, value in record.items() if key != "step"})
        return record

    def save(step):
        rng = [_rng_state(device)]
        if info.enabled:
            rng = [None] * info.world
            dist.all_gather_object(rng, _rng_state(device))
        if info.main:
            ema.copy_to(export)
            directory = stage_dir / "checkpoints" / f"step_{step:07d}"
            trainer_state = {"step": step, "rng": rng, "world_size": info.world, "history": history,
                             "ema_decay": ema.decay, "ema_updates": ema.updates, "k": k,
                             "initial": summary.get("initial")}
            ckpt.save_checkpoint(directory, export, tokenizer, optimizer, trainer_state,
                                 extra={"distill": _json_config(config), "stage": k, "step": step,
                                        "data_dir": str(dataset.directory.resolve())})
            from safetensors.torch import save_file
            state = {n: v.detach().to("cpu").contiguous() for n, v in student.state_dict().items()}
            tmp = directory / ".student.safetensors.tmp"
            save_file(state, str(tmp))
            tmp.replace(directory / "student.safetensors")
            ckpt.write_latest(stage_dir, directory, step)
            _prune(stage_dir / "checkpoints", config.keep_checkpoints, keep=directory)
        info.barrier()

    bar = tqdm(total=steps, initial=start_step, disable=not (config.progress and info.main),
               desc=f"distill k={k}" + (f" (from k={summary['teacher_max_k']})" if summary["teacher_max_k"] else
                                        " (from AR)"), unit="step", dynamic_ncols=True)
    if start_step == 0:
        first = evaluate(0, with_ar=True)
        summary["initial"] = {key: value for key, value in first.items() if key != "step"}
    elif initial is not None:
        summary["initial"] = initial
    stop_at = steps if config.stop_after is None else min(steps, config.stop_after - steps_before)
    windows_per_step = global_batch * seq_len
    window_start = time.perf_counter()
    window = {"loss": 0.0, "steps": 0, "offset_loss": torch.zeros(hints), "offset_acc": torch.zeros(hints),
              "exact": 0.0, "valid": 0.0}
    step = start_step
    plateaued = False
    while step < stop_at:
        lr = warmup_cosine_lr(step, steps, peak, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for micro in range(config.grad_accum):
            first = (micro * info.world + info.rank) * config.batch_size
            keys = step * global_batch + first + torch.arange(config.batch_size, device=device)
            ids, u, tau, targets, valid = make_batch("train", step, first, keys, teacher)
            sync = micro == config.grad_accum - 1 or not info.enabled
            with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
                logits = train_model(ids, u, tau)
                loss, offset_loss, offset_acc, exact = window_loss(logits, targets)
            (loss / config.grad_accum).backward()
            window["loss"] += loss.item() / config.grad_accum
            window["offset_loss"] += offset_loss.cpu() / config.grad_accum
            window["offset_acc"] += offset_acc.cpu() / config.grad_accum
            window["exact"] += exact.item() / config.grad_accum
            if valid is not None:
                window["valid"] += valid.item() / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(student)
        step += 1
        window["steps"] += 1
        bar.update(1)
        if step % config.log_interval == 0 or step == stop_at:
            n = window["steps"]
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "train_loss": _all_mean(window["loss"] / n, info, device), "lr": lr,
                      "grad_norm": grad_norm, "train_exact_match": _all_mean(window["exact"] / n, info, device),
                      "windows": step * windows_per_step, "windows_per_s": n * windows_per_step / elapsed}
            for j in range(hints):
                record[f"train_loss_{j + 1}"] = _all_mean(window["offset_loss"][j].item() / n, info, device)
                record[f"train_acc_{j + 1}"] = _all_mean(window["offset_acc"][j].item() / n, info, device)
            if objective == "noise-inversion":
                record["inversion_valid"] = _all_mean(window["valid"] / n, info, device)
            metrics.log(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", exact=f"{record['train_exact_match']:.3f}",
                            lr=f"{lr:.1e}")
            summary["train_loss"] = record["train_loss"]
            window_start = time.perf_counter()
            window = {"loss": 0.0, "steps": 0, "offset_loss": torch.zeros(hints), "offset_acc": torch.zeros(hints),
                      "exact": 0.0, "valid": 0.0}
        finishing = step == steps
        if step % config.eval_interval == 0 and not finishing:
            record = validate(step)
            history.append(record["val_exact_match"])
            plateaued = finishing = _plateaued(history, config, step)
            if plateaued:
                record.update(ar_agreement(step))
            metrics.log(record)
            summary.update({key: value for key, value in record.items() if key != "step"})
        elif finishing:
            evaluate(step, with_ar=True)
        if finishing:
            save(step)
            break
        if step % config.save_interval == 0 or step == stop_at:
            save(step)
    bar.close()
    metrics.close()
    if step < steps and not plateaued:
        return None
    summary.update({"step": step, "plateaued": plateaued, "windows": step * windows_per_step,
                    "tokens": step * global_batch * seq_len})
    final = stage_dir / "final"
    if info.main:
        ema.copy_to(export)
        ckpt.save_checkpoint(final, export, tokenizer,
                             extra={"distill": _json_config(config), "stage": k, "step": step,
                                    "data_dir": str(dataset.directory.resolve()),
                                    "summary": {key: v for key, v in summary.items() if key != "initial"}})
        ckpt._write_json(stage_dir / DONE_FILE, summary)
    info.barrier()
    return summary


def _mid_tau(tau_range):
    """The temperature the AR agreement is measured at: 1.0 when trained on it, else the middle of the range."""
    low, high = tau_range
    return 1.0 if low <= 1.0 <= high else 0.5 * (low + high)


def _plateaued(history: List[float], config: DistillConfig, step: int) -> bool:
    """True when the last `plateau_patience` validations gained less than plateau_delta over the best before."""
    patience = config.plateau_patience
    if patience is None or step < config.min_steps or len(history) <= patience:
        return False
    return max(history[-patience:]) < max(history[:-patience]) + config.plateau_delta


__all__ = ["DistillConfig", "DistillError", "EMA", "OBJECTIVES", "ar_targets", "batch_noise", "check_schedule",
           "distill", "noise_inversion_batch", "parse_int_list", "parse_tau",
           "self_forcing_targets", "window_loss"]
