"""Progressive self-forcing distillation: AR teacher -> k=1 -> k=2 -> k=4 students (`kforcing distill`).

    kforcing distill --teacher runs/teacher --schedule 1,2,4 --out runs/student
    torchrun --nproc_per_node 8 -m kforcing.cli distill --teacher runs/teacher --out runs/student

The method is docs/method.md §5; what each stage learns (targets, noise, loss) is `kforcing.training.targets`. This
module runs the schedule: each stage's student (`PushForwardLM.from_teacher`) starts from its teacher's weights (for an
AR teacher only the noise encoder is new) and is trained by the shared loop of `kforcing.training.trainer`, with an
exponential moving average of its weights: the EMA is what is evaluated, exported and used as the next stage's teacher.
The teacher passes that make targets always run in float32 (the tokens must be the teacher's decode-time tokens).

Steps per stage are fixed (`steps`), or with `plateau_patience` a stage also ends early when the validation
exact match (against the stage's targets) has not improved by `plateau_delta` over the last `plateau_patience`
evaluations. The cosine schedule always spans `steps`.

Run directory (OUT, file names owned by `kforcing.checkpoints.checkpoint.RunLayout`):

    distill.json                  the settings of the run (checked on --resume)
    tokenizer.json                the teacher's tokenizer
    stage_k1/ metrics.jsonl       per-stage metrics: training lines every log_interval steps, validation lines
              checkpoints/step_N  training checkpoints: model.safetensors holds the EMA weights (the export),
                                  raw_weights.safetensors the optimised weights, trainer_state.pt the step and the
                                  plateau history, optimizer.pt the optimizer
              latest.json         the newest training checkpoint
              final/              the stage's exported student (EMA weights), and done.json its summary
    stage_k2/ ...
    latest.json                   points to the last finished stage's final/: `kforcing sample --ckpt OUT`,
                                  `kforcing eval --student OUT` use it

Contexts come from the teacher's own token cache, found through its checkpoint's `Provenance`, unless `corpus`
or `data_dir` say otherwise.
"""

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import Provenance, RunLayout
from ..checkpoints.loading import load_model
from ..data import TokenDataset, Tokenizer, find_token_cache, heldout_contexts, prepare_dataset
from ..evaluation.metrics import coupled_agreement
from ..models.transformer import ARModel
from ..options import option, parse_int_list
from ..runtime import read_json, resolve_device, run_lock, write_json_atomic
from ..students.draft_student import CDF_ORDERS, NOISE_CODES, READOUTS, DraftStudent, HeadConfig, Sampling
from ..students.push_forward import PushForwardLM
from ..teachers.hf_teacher import HFTeacher
from ..teachers.protocol import is_teacher
from .distill_draft import check_draft_run, run_draft_stage
from .head_targets import WINDOWS
from .stage_task import DistillError, StageTask, plateaued
from .targets import ar_targets, batch_noise, noise_inversion_batch, self_forcing_targets, window_loss
from .trainer import (DistInfo, Trainer, check_loop_options, distributed, loop_option,
                      warn_changed_settings)

OBJECTIVES = ("self-forcing", "noise-inversion")
# full: a PushForwardLM (every weight trains); head / trunk / chain: a DraftStudent (the teacher frozen; a hint head
# on its final states, adapters on its blocks for hint rows only, or a chain head drafting one token per call).
PATHWAYS = ("full", "head", "trunk", "chain")
DEFAULT_SCHEDULES = {"full": [1, 2, 4], "head": [4], "trunk": [4], "chain": [4]}
# The chain student's default draft vocabulary: V / DRAFT_VOCAB_SHARE tokens from DRAFT_VOCAB_MIN_VOCAB up (see
# _resolve_draft_vocab).
DRAFT_VOCAB_SHARE, DRAFT_VOCAB_MIN_VOCAB = 8, 8192
CHAIN_HEAD_LAYERS = 1  # the chain head's default depth: one copy of the teacher's last block
# The student `kforcing distill` trains unless told otherwise: the design comparison (README, bench/results/
# ablation_draft_cpu and round_cost_cpu) found the chain pathway's round the cheapest per draft on weight-bound
# models and its unverified samples the closest to the teacher's.
DEFAULT_PATHWAY = "chain"
# The distribution a draft student learns unless told otherwise: truncated sampling, what users sample with; the
# ablation in bench/results/ablation_draft_cpu compares it with temperature 1 over the whole vocabulary.
DRAFT_SAMPLING = dict(temperature=0.7, top_k=50, top_p=0.9)
_VAL_OFFSET = 1 << 40  # sample keys of validation batches start here (training keys stay far below)


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
# Settings


@dataclasses.dataclass
class DistillConfig:
    """Everything a distillation run needs; each field's help is its `kforcing distill` flag's.

    Attributes (the less obvious ones):
        teacher: the AR teacher: a checkpoint directory or a `train-teacher` run directory. A K-Forcing student
            checkpoint with max_k = m also works, to continue a schedule that starts at 2m.
        schedule: the students' max_k, in order: 1, 2, 4, ... (each stage doubles k; noise-inversion only needs
            an increasing schedule).
        steps: optimizer steps per stage: one value for every stage or one per stage.
        seq_len: context tokens N per sequence (each has N windows); default: the teacher's training length, at
            most max_seq_len - max(schedule) so that every window's tokens fit the model's positions.
        tau: (min, max): each sequence's temperature is drawn uniformly from this range; (1, 1) fixes it.
        lr: peak learning rate; default 1e-3 for models up to 256 wide, 3e-4 above.
        stop_after: stop (with a checkpoint) after this many optimizer steps in total, counted over all stages.
    """

    teacher: str = option(help="the AR teacher: a checkpoint or a train-teacher run directory, or hf:PATH (a Hugging "
                          "Face causal LM saved with save_pretrained, with its tokenizer.json; or hf:HUB_NAME)",
                          required=True)
    out_dir: str = option(help="run directory of the students", flag="--out", required=True)
    paper: bool = option(False, "the original method in one flag: --pathway full (every weight fine-tuned), "
                         "progressive self-forcing 1,2,4 at temperature 1, sinusoidal noise code, one-hot readout, "
                         "vocabulary CDF order; it overrides those settings")
    pathway: str = option(DEFAULT_PATHWAY, "the student: full (every weight fine-tuned, hint rows through the "
                          "whole model: the original method), head (a hint head on the frozen teacher's final "
                          "states), trunk (hint rows through the frozen teacher with adapters) or chain (a one-block "
                          "head that drafts one token per call from the teacher's features); head, trunk and chain "
                          "keep the teacher's token rows exact and decode losslessly with verification",
                          choices=list(PATHWAYS))
    schedule: Optional[List[int]] = option(None, "the stages' k: full doubles from 1 (default 1,2,4); head grows "
                                           "from k >= 2 (default 4)",
                                           convert=lambda text: parse_int_list(text, "--schedule") if text else None)
    readout: Optional[str] = option(None, "head/trunk: categorical (default, and chain's only one: each row outputs "
                                    "the next token's distribution, sampled with that token's uniform) or onehot "
                                    "(the draft is the argmax of a row that sees its own uniform; the full "
                                    "pathway's)",
                                    choices=list(READOUTS))
    head_layers: Optional[int] = option(None, "head/chain: Transformer blocks of the head, copied from the teacher's "
                                        f"last ones (default {HeadConfig.num_layers} for head, {CHAIN_HEAD_LAYERS} "
                                        "for chain)")
    adapter_rank: Optional[int] = option(None, "trunk: the rank of the hint-row LoRA on every linear layer; 0: a "
                                         "full copy of the block weights for hint rows (default: 0 for kforcing's "
                                         "own teachers, 8 for a Hugging Face teacher, which takes LoRAs only)")
    draft_vocab: Optional[int] = option(None, "chain: draft only from this many of the training text's most frequent "
                                        "tokens (a smaller LM head read per draft; verification stays exact); 0: "
                                        "the whole vocabulary; default: V/8 for vocabularies of 8192 tokens or more, "
                                        "where the drafts' LM head is most of a round's extra bytes, else the whole "
                                        "vocabulary")
    windows: str = option("student", "head: the windows targets are made on: student (its own drafts, on-policy) or "
                          "teacher (exact teacher rollouts)", choices=list(WINDOWS))
    top_k: Optional[int] = option(None, "draft pathways: the top-k of the sampling distribution the head learns (0: "
                                  f"off; default {DRAFT_SAMPLING['top_k']})")
    top_p: Optional[float] = option(None, "draft pathways: the top-p of the sampling distribution the head learns (1: "
                                    f"off; default {DRAFT_SAMPLING['top_p']})")
    boundary_beta: Optional[float] = option(None, "head/trunk with --readout onehot --windows teacher: move each "
                                            "training uniform inside its target token's CDF interval by a Beta(B, "
                                            "B) draw (B < 1: near the token's boundaries, where the argmax must "
                                            "switch); default off (uniform u). Evaluation always uses uniform u")
    cdf_order: str = option("vocab", "head: the token order of the inverse CDF that maps u to tokens: vocab (token "
                            "ids) or descending (probability); sample and eval with the same", choices=list(CDF_ORDERS))
    noise_code: str = option("sinusoid", "head: how hint rows encode their uniforms: sinusoid, dyadic (frequencies "
                             "2^j) or binary (the digits of u)", choices=list(NOISE_CODES))
    objective: str = option("self-forcing", "self-forcing (the teacher's own tokens) or the noise-inversion baseline "
                            "(data tokens, u drawn inside their teacher-CDF interval)", choices=list(OBJECTIVES))
    steps: List[int] = option([1000], "optimizer steps per stage: one value, or one per stage (500,500,1000)",
                              convert=lambda text: parse_int_list(text, "--steps"), flag_default="1000")
    batch_size: int = loop_option("batch_size")
    grad_accum: int = loop_option("grad_accum")
    seq_len: Optional[int] = option(None, "context tokens per sequence, each the anchor of a window (default: the "
                                    "teacher's training length, at most max_seq_len - max k)")
    tau: Optional[Tuple[float, float]] = option(
        None, "the temperature the student learns: T, or (full pathway) MIN:MAX to draw one per sequence uniformly "
        f"(e.g. 0.7:1.2); default 1.0 for full, {DRAFT_SAMPLING['temperature']} for the draft pathways",
        convert=lambda text: parse_tau(text) if text else None)
    lr: Optional[float] = option(None, "peak learning rate (default: 1e-3 up to width 256, 3e-4 above)")
    min_lr_ratio: float = loop_option("min_lr_ratio")
    warmup_steps: int = loop_option("warmup_steps", 50, "linear warmup steps per stage")
    weight_decay: float = loop_option("weight_decay", 0.0)
    beta1: float = loop_option("beta1")
    beta2: float = loop_option("beta2")
    grad_clip: float = loop_option("grad_clip")
    ema_decay: float = option(0.999, "EMA decay of the exported weights")
    noise_lr_scale: float = option(1.0, "learning-rate multiplier of the noise encoder (the only new weights of "
                                   "stage 1)")
    plateau_patience: Optional[int] = option(None, "also end a stage once this many evaluations in a row gain less "
                                             "than --plateau-delta in validation exact match (default: off)")
    plateau_delta: float = option(0.005, "the gain that counts as progress")
    min_steps: int = option(0, "no plateau stop before this many steps of a stage")
    corpus: Optional[List[str]] = option(None, "contexts from this corpus (as in train-teacher); default: the "
                                         "teacher's own token cache", action="append")
    text_field: str = option("text", "the text field of JSONL records / dataset rows")
    corpus_max_bytes: Optional[int] = option(None, "read at most this many MB of --corpus", flag="--corpus-max-mb",
                                             convert=lambda mb: None if mb is None else int(mb * 1e6), type=float)
    data_dir: Optional[str] = option(None, "token cache directory for --corpus (default: OUT/data)")
    val_fraction: float = option(0.01, "held-out share of documents for --corpus")
    eval_interval: int = loop_option("eval_interval", help="steps between validation metrics")
    eval_batches: int = option(8, "batches per validation")
    ar_eval_contexts: int = option(128, "held-out contexts for the coupled agreement with the AR teacher at the "
                                   "start and end of each stage (0: off)")
    save_interval: int = loop_option("save_interval", 500)
    log_interval: int = loop_option("log_interval")
    keep_checkpoints: int = loop_option("keep_checkpoints", help="training checkpoints kept per stage")
    seed: int = option(0, "seed of the noise, the temperatures and the data order")
    device: str = loop_option("device")
    dtype: str = loop_option("dtype", help="autocast dtype of the student; auto = bfloat16 on GPU, float32 on CPU "
                             "(targets: float32 teacher passes, float64 CDF)")
    compile: bool = loop_option("compile", help="torch.compile the student's training forward")
    resume: bool = loop_option("resume", help="continue the run in OUT: finished stages are kept, an interrupted one "
                               "continues exactly")
    stop_after: Optional[int] = loop_option("stop_after", help="stop (with a checkpoint) after this many steps in "
                                            "total over all stages")
    tensorboard: bool = loop_option("tensorboard", help="also write TensorBoard events per stage")
    progress: bool = loop_option("progress", help="hide the progress bars")

    def validate(self):
        if self.paper:
            self._apply_paper()
        if self.objective not in OBJECTIVES:
            raise DistillError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.pathway not in PATHWAYS:
            raise DistillError(f"unknown pathway {self.pathway!r}; choose one of {PATHWAYS}")
        if self.schedule is None:
            self.schedule = list(DEFAULT_SCHEDULES[self.pathway])
        if self.pathway == "full":
            self._validate_full()
        else:
            self._validate_draft()
        self.stage_steps()  # validates steps
        check_loop_options(self, DistillError)
        for name in ("min_steps", "ar_eval_contexts"):
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

    def _apply_paper(self):
        """--paper: the original method. Settings it fixes may not be given beside it (they would be ignored)."""
        given = [name for name, value, default in (
            ("pathway", self.pathway, DEFAULT_PATHWAY), ("tau", self.tau, None), ("top_k", self.top_k, None),
            ("top_p", self.top_p, None), ("readout", self.readout, None), ("head_layers", self.head_layers, None),
            ("adapter_rank", self.adapter_rank, None), ("draft_vocab", self.draft_vocab, None),
            ("windows", self.windows, "student"),
            ("noise_code", self.noise_code, "sinusoid"), ("cdf_order", self.cdf_order, "vocab"),
            ("objective", self.objective, "self-forcing"), ("boundary_beta", self.boundary_beta, None))
            if value != default and value != "full"]
        if given:
            raise DistillError(f"--paper fixes {', '.join('--' + n.replace('_', '-') for n in given)}; drop "
                               "them, or use --pathway full to choose settings yourself")
        self.pathway, self.tau = "full", (1.0, 1.0)

    def _validate_full(self):
        check_schedule(self.schedule, self.objective, start=None)
        self.tau = self.tau or (1.0, 1.0)
        draft_only = {"top_k": (self.top_k, None), "top_p": (self.top_p, None), "readout": (self.readout, None),
                      "head_layers": (self.head_layers, None), "adapter_rank": (self.adapter_rank, None),
                      "draft_vocab": (self.draft_vocab, None),
                      "windows": (self.windows, "student"), "cdf_order": (self.cdf_order, "vocab"),
                      "noise_code": (self.noise_code, "sinusoid"), "boundary_beta": (self.boundary_beta, None)}
        for name, (value, default) in draft_only.items():
            if value != default:  # the push-forward student has no such option: never ignore it silently
                raise DistillError(f"--{name.replace('_', '-')} applies to the draft pathways (head, trunk, "
                                   "chain); the full pathway samples the whole distribution at its temperature in "
                                   "vocabulary order with a one-hot readout")

    def _validate_draft(self):
        self.tau = self.tau or (DRAFT_SAMPLING["temperature"],) * 2
        self.readout = self.readout or HeadConfig.readout
        self.top_k = DRAFT_SAMPLING["top_k"] if self.top_k is None else self.top_k
        self.top_p = DRAFT_SAMPLING["top_p"] if self.top_p is None else self.top_p
        other = {"head": [("adapter_rank", self.adapter_rank, None)],
                 "trunk": [("head_layers", self.head_layers, None)],
                 "chain": [("adapter_rank", self.adapter_rank, None), ("windows", self.windows, "student"),
                           ("noise_code", self.noise_code, "sinusoid")]}[self.pathway]
        for name, value, default in other:
            if value != default:
                raise DistillError(f"--{name.replace('_', '-')} does not apply to --pathway {self.pathway}")
        default_layers = CHAIN_HEAD_LAYERS if self.pathway == "chain" else HeadConfig.num_layers
        self.head_layers = default_layers if self.head_layers is None else self.head_layers
        if self.objective != "self-forcing":
            raise DistillError(f"--objective {self.objective} is for --pathway full; a head learns from the teacher's "
                               "exact windows (--windows)")
        check_schedule(self.schedule, "growth", start=2)
        if (self.pathway, self.readout) == ("trunk", "categorical") and self.schedule[0] < 3:
            # the trunk's categorical draft of token 2 is the teacher's own row: exact, nothing to learn
            raise DistillError(f"schedule {list(self.schedule)}: a categorical trunk student drafts token 2 with the "
                               "teacher's own row, so it has nothing to train below k = 3 (start at k >= 3)")
        if self.boundary_beta is not None:
            if not 0.0 < self.boundary_beta < math.inf:
                raise DistillError(f"--boundary-beta must be positive and finite, got {self.boundary_beta}")
            if (self.readout, self.windows) != ("onehot", "teacher"):
                raise DistillError(f"--boundary-beta needs --readout onehot --windows teacher (got --readout "
                                   f"{self.readout} --windows {self.windows}): a categorical row never sees its own "
                                   "uniform, and the tokens of the student's own windows depend on the uniforms")
        if self.draft_vocab is not None and self.draft_vocab != 0 and self.draft_vocab < 2:
            raise DistillError(f"--draft-vocab must be 0 (the whole vocabulary) or at least 2 tokens, got "
                               f"{self.draft_vocab}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise DistillError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")
        try:
            self.head_config()
        except ValueError as error:
            raise DistillError(str(error)) from None

    def head_config(self) -> HeadConfig:
        """The hint head a draft pathway trains (max_k: the schedule's largest k)."""
        return HeadConfig(num_layers=self.head_layers, max_k=max(self.schedule), readout=self.readout,
                          pathway=self.pathway, adapter_rank=self.adapter_rank, noise_code=self.noise_code,
                          draft_vocab=self.draft_vocab or None)

    def sampling(self) -> Sampling:
        """The sampling distribution a draft pathway's head learns: --tau, --top-k, --top-p, --cdf-order."""
        return Sampling(self.tau[0], self.top_k, self.top_p, self.cdf_order)

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

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["tau"] = list(data["tau"])
        return data


def check_schedule(schedule: Sequence[int], objective: str = "self-forcing", start: Optional[int] = 1):
    """Raise DistillError unless `schedule` is a valid list of stage sizes k.

    Self-forcing builds stage 2k's targets from two k-token steps of the stage-k student, so the schedule must start
    at `start` (1 from an AR teacher, 2m from a student with max_k m) and double at every stage: 1,2,4,8.
    Noise-inversion targets come from data, so any strictly increasing schedule starting at >= start works.
    start=None skips the check of the first stage (the teacher is not known yet).
    """
    if not schedule or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in schedule):
        raise DistillError(f"schedule must be a non-empty list of positive ints such as 1,2,4, got {schedule!r}")
    if objective == "growth":  # a draft student's head: any increasing schedule from k >= start
        if schedule[0] < start:
            raise DistillError(f"schedule {list(schedule)} must start at k >= {start}: the head drafts tokens 2..k")
        for a, b in zip(schedule, schedule[1:]):
            if b <= a:
                raise DistillError(f"schedule {list(schedule)} must increase, got k={a} then k={b}")
        return
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


def _mid_tau(tau_range):
    """The temperature the AR agreement is measured at: 1.0 when trained on it, else the middle of the range."""
    low, high = tau_range
    return 1.0 if low <= 1.0 <= high else 0.5 * (low + high)


class _StudentForward(nn.Module):
    """forward() = student.forward_train, so that DistributedDataParallel sees the training call."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, ids, u, tau):
        return self.student.forward_train(ids, u, tau)


# ---------------------------------------------------------------------------------------------------------
# One stage


@dataclasses.dataclass
class Stage:
    """One stage of the schedule: what it trains from and on."""

    index: int
    k: int
    steps: int
    layout: RunLayout
    teacher: nn.Module  # the stage's teacher: the AR model, or the previous stage's student
    ar_teacher: Optional[ARModel]  # the AR teacher of the run, when there is one (agreement, noise inversion)
    teacher_checkpoint: str


class PushForwardStageTask(StageTask):
    """The loss, validation and AR agreement of one distillation stage of a push-forward student."""

    unit = "windows"
    bar_stats = {"exact": "train_exact_match"}
    plateau_metric = "val_exact_match"

    def __init__(self, config: DistillConfig, stage: Stage, dataset: TokenDataset, seq_len: int, info: DistInfo,
                 device):
        super().__init__(config, dataset, seq_len, stage.k, stage.teacher_checkpoint)
        self.stage, self.info, self.device = stage, info, device
        self.hints = stage.k
        self.global_batch = config.batch_size * config.grad_accum * info.world
        self.units_per_step = self.global_batch * seq_len
        teacher_k = getattr(stage.teacher, "max_k", 0)
        self.name = f"distill k={stage.k}" + (f" (from k={teacher_k})" if teacher_k else " (from AR)")
        self.contexts = []
        if stage.ar_teacher is not None and config.ar_eval_contexts:
            max_len = min(seq_len, stage.teacher.config.max_seq_len - stage.k)
            self.contexts = heldout_contexts(dataset, config.ar_eval_contexts, max_len=max_len, seed=config.seed)

    def batch(self, split, step, first, sample_keys):
        """(ids, u, tau, targets, share of valid noise inversions or None) of one micro-batch."""
        config, stage = self.config, self.stage
        noise_inversion = config.objective == "noise-inversion"
        data_len = self.seq_len + self.hints - 1 if noise_inversion else self.seq_len
        x, y = self.dataset.batch(split, step, len(sample_keys), data_len, config.seed + 104729 * (stage.index + 1),
                                  first_index=first, device=self.device)
        u, tau = batch_noise(config.seed, stage.index, sample_keys, self.seq_len, self.hints, config.tau)
        if noise_inversion:
            ids, u, targets, valid = noise_inversion_batch(stage.ar_teacher, torch.cat([x, y[:, -1:]], dim=1), u, tau)
            return ids, u, tau, targets, valid.float().mean()
        if isinstance(stage.teacher, ARModel):
            return x, u, tau, ar_targets(stage.teacher, x, u, tau), None
        return x, u, tau, self_forcing_targets(stage.teacher, x, u, tau), None

    def loss(self, module, step, first_index):
        keys = step * self.global_batch + first_index + torch.arange(self.config.batch_size, device=self.device)
        ids, u, tau, targets, valid = self.batch("train", step, first_index, keys)
        loss, offset_loss, offset_acc, exact = window_loss(module(ids, u, tau), targets)
        stats = {"train_exact_match": exact.item(), "train_loss_{}": offset_loss.cpu(),
                 "train_acc_{}": offset_acc.cpu()}
        if valid is not None:
            stats["inversion_valid"] = valid.item()
        return loss, stats

    @torch.no_grad()
    def validate(self, step, model):
        """Validation loss/accuracy against the stage's targets (EMA weights), all ranks."""
        config, hints = self.config, self.hints
        total = torch.zeros(3 + 2 * hints, dtype=torch.float64, device=self.device)
        for i in range(self.info.rank, config.eval_batches, self.info.world):
            keys = _VAL_OFFSET + i * config.batch_size + torch.arange(config.batch_size, device=self.device)
            ids, u, tau, targets, _ = self.batch("val", i, i * config.batch_size, keys)
            with self.autocast():
                logits = model.forward_train(ids, u, tau)
            loss, offset_loss, offset_acc, exact = window_loss(logits, targets)
            one = torch.ones((), device=self.device, dtype=torch.float64)
            total += torch.cat([torch.stack([loss.double(), exact.double(), one]), offset_loss.double(),
                                offset_acc.double()])
        if self.info.enabled:
            dist.all_reduce(total)
        n = total[2].item()
        record = {"step": step, "val_loss": total[0].item() / n, "val_exact_match": total[1].item() / n}
        for j in range(hints):
            record[f"val_loss_{j + 1}"] = total[3 + j].item() / n
            record[f"val_acc_{j + 1}"] = total[3 + hints + j].item() / n
        return record

    def teacher_measurement(self, model):
        if not self.contexts or not self.info.main:
            return {}
        # The same contexts and uniforms in every stage: a stage starts where the previous one ended.
        result = coupled_agreement(self.stage.ar_teacher, model, self.contexts, self.stage.k, seed=self.config.seed,
                                   temperature=_mid_tau(self.config.tau))
        record = {"ar_exact_match": result["exact_match"]}
        for j, value in enumerate(result["per_offset"]):
            record[f"ar_agree_{j + 1}"] = value
        return record


def _check_stage_teacher(config: DistillConfig, stage: Stage):
    if config.objective != "self-forcing":
        return
    if isinstance(stage.teacher, PushForwardLM):
        if stage.teacher.max_k < stage.k // 2:
            raise DistillError(f"stage k={stage.k} needs a teacher with max_k >= {stage.k // 2}, got "
                               f"max_k={stage.teacher.max_k}")
    elif stage.k != 1:
        raise DistillError(f"self-forcing stage k={stage.k} needs a K-Forcing teacher; an AR teacher only starts k=1")


def run_stage(config: DistillConfig, stage: Stage, dataset: TokenDataset, tokenizer, seq_len: int, info: DistInfo,
              device, steps_before: int) -> Optional[dict]:
    """Train one stage; returns its summary, or None when stop_after ended the run inside it."""
    for model in (stage.teacher, stage.ar_teacher):
        if model is not None:
            model.eval().requires_grad_(False)
    _check_stage_teacher(config, stage)
    torch.manual_seed(config.seed + 7919 * stage.index)  # the same new noise encoder on every rank
    student = PushForwardLM.from_teacher(stage.teacher, stage.k).to(device)
    student.train().requires_grad_(True)
    task = PushForwardStageTask(config, stage, dataset, seq_len, info, device)
    stop_at = stage.steps if config.stop_after is None else min(stage.steps, config.stop_after - steps_before)
    peak = config.effective_lr(student.config)
    trainer = Trainer(task, student, config, stage.layout, info, device, stage.steps, stop_at, peak,
                      tokenizer=tokenizer, forward=_StudentForward(student), scaled_prefix="noise.",
                      lr_scale=config.noise_lr_scale, ema_decay=config.ema_decay)
    torch.manual_seed(config.seed + 7919 * stage.index + 1000003 * info.rank)  # per-rank dropout streams, if any
    start = ckpt.find_resume_checkpoint(stage.layout.root)
    if start is not None:
        if not config.resume:
            raise DistillError(f"{stage.layout.root} holds a training checkpoint; pass --resume to continue it")
        trainer.resume(start)
    was_plateaued = trainer.run()
    if trainer.step < stage.steps and not was_plateaued:
        return None
    summary = {"k": stage.k, "objective": config.objective, "steps_budget": stage.steps, "seq_len": seq_len,
               "global_batch": task.global_batch, "lr": peak, "teacher_max_k": getattr(stage.teacher, "max_k", 0),
               "initial": task.initial, **task.records, "train_loss": trainer.last.get("train_loss"),
               "step": trainer.step, "plateaued": was_plateaued, "windows": trainer.step * task.units_per_step,
               "tokens": trainer.step * task.global_batch * seq_len}
    if info.main:
        provenance = task.provenance(trainer.step, {key: v for key, v in summary.items() if key != "initial"})
        ckpt.save_checkpoint(stage.layout.final, trainer.eval_model(), tokenizer, provenance=provenance)
        write_json_atomic(stage.layout.done, summary)
    info.barrier()
    return summary


# ---------------------------------------------------------------------------------------------------------
# The run


def _token_cache(config: DistillConfig, teacher: Optional[Provenance], tokenizer: Optional[Tokenizer],
                 layout: RunLayout, info: DistInfo) -> TokenDataset:
    """The token dataset contexts come from: the teacher's own cache (its provenance), or --corpus / --data-dir."""
    if tokenizer is None:
        raise DistillError(f"teacher {ckpt.describe_source(config.teacher)} has no tokenizer.json: the contexts "
                           "cannot be tokenised (and the students would have no tokenizer)")
    if config.data_dir is None and config.corpus is None:
        candidates = [teacher.token_cache if teacher else None, RunLayout(Path(config.teacher).expanduser()).data]
        dataset = find_token_cache(candidates, tokenizer)
        if dataset is not None:
            return dataset
    settings = teacher.settings if teacher is not None and teacher.stage == "teacher" else {}
    corpus = config.corpus or settings.get("corpus")
    if not corpus:
        raise DistillError(f"cannot find the teacher's training data next to {config.teacher}; pass --corpus "
                           "(e.g. --corpus stdlib) to draw contexts from a corpus")
    data_dir = Path(config.data_dir) if config.data_dir else layout.data
    own = config.corpus is not None
    args = (corpus, tokenizer, data_dir, config.val_fraction if own else settings.get("val_fraction", 0.01),
            config.text_field if own else settings.get("text_field", config.text_field),
            config.corpus_max_bytes if own else settings.get("corpus_max_bytes"))
    if info.main:
        dataset = prepare_dataset(*args, progress=config.progress)
    info.barrier()
    return dataset if info.main else prepare_dataset(*args, verify=False)


_TRAJECTORY_FIELDS = ("objective", "steps", "batch_size", "grad_accum", "seq_len", "tau", "lr", "min_lr_ratio",
                      "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "ema_decay", "plateau_patience",
                      "plateau_delta", "min_steps", "corpus", "seed", "dtype")


def distill(config: DistillConfig) -> dict:
    """Run (or resume) a progressive distillation; returns a summary.

    The summary: {"stages": [per-stage summaries (k, steps, final checkpoint, val metrics, AR agreement)],
    "checkpoint": the final student's directory, "out_dir"}.

    Raises DistillError / ValueError for bad settings, kforcing.checkpoints.checkpoint.CheckpointError for missing or
    unfitting checkpoints, kforcing.data errors for data problems, kforcing.training.trainer.TrainingError for a
    non-finite loss.
    """
    config.validate()
    with distributed(config.device) as info:
        # One writer per run directory: the lock is taken before the checks for an existing run, so two runs
        # started together on one --out cannot both pass them (under torchrun, rank 0 holds it for all).
        with run_lock(config.out_dir, "distill") if info.main else contextlib.nullcontext():
            return _distill(config, info)


HF_CONTEXT_LEN = 256  # default contexts of a Hugging Face teacher (--seq-len overrides)


def _context_length(config: DistillConfig, teacher, provenance: Optional[Provenance]) -> int:
    max_k, max_seq = max(config.schedule), teacher.config.max_seq_len
    if config.seq_len is not None:
        seq_len = config.seq_len
    else:  # the teacher's training length (a teacher run's only: a student's is its own context length)
        trained = provenance.seq_len if provenance is not None and provenance.stage == "teacher" else None
        if isinstance(teacher, HFTeacher):  # no recorded training length; its max_seq_len can be 100k+
            trained = HF_CONTEXT_LEN
        seq_len = min(trained or max_seq, max_seq - max_k)
    if seq_len < 1 or seq_len + max_k > max_seq:
        raise DistillError(f"seq_len={seq_len} + max k={max_k} exceeds the teacher's max_seq_len={max_seq}: every "
                           "window's tokens must fit the model's positions")
    return seq_len


def _write_settings(config: DistillConfig, layout: RunLayout, teacher_id: str, seq_len: int):
    """distill.json: checked against the current settings on --resume (another teacher is an error)."""
    current = config.to_json()
    if layout.distill_settings.is_file():
        saved = read_json(layout.distill_settings)
        if saved.get("teacher_checkpoint") not in (None, teacher_id):
            raise DistillError(f"{layout.root} was distilled from {saved['teacher_checkpoint']}, not {teacher_id}; "
                               "resume with the original --teacher or choose another --out")
        warn_changed_settings(saved, current, _TRAJECTORY_FIELDS, True)
    write_json_atomic(layout.distill_settings, {**current, "teacher_checkpoint": teacher_id,
                                                "seq_len_used": seq_len})


def _resolve_draft_vocab(config: DistillConfig, teacher, layout: RunLayout, resuming: bool) -> int:
    """A chain student's --draft-vocab as a number (0: the whole vocabulary): as given; left at the default, the
    run's own when resuming (0 for a run written before the default existed), else V / DRAFT_VOCAB_SHARE for
    vocabularies of DRAFT_VOCAB_MIN_VOCAB tokens or more (bench/results/draft_small_cpu/draft_vocab/: on the small
    preset, V = 8192, it decodes faster at the same acceptance) and the whole vocabulary below (on the tiny one a
    restricted vocabulary lowered acceptance and saved nothing: docs/students.md)."""
    if config.draft_vocab is not None:
        return config.draft_vocab
    if resuming:
        saved = read_json(layout.distill_settings).get("draft_vocab")
        return 0 if saved is None else int(saved)
    vocab = teacher.config.vocab_size
    return vocab // DRAFT_VOCAB_SHARE if vocab >= DRAFT_VOCAB_MIN_VOCAB else 0


def _distill(config: DistillConfig, info: DistInfo) -> dict:
    device = resolve_device(config.device, info.local_rank)
    layout = RunLayout(config.out_dir)
    if info.main:
        layout.claim("distill", "distill")
    if layout.distill_settings.is_file() and not config.resume:
        raise DistillError(f"{layout.root} already holds a distillation run; pass --resume to continue it (finished "
                           "stages are kept), or choose another --out")
    resuming = config.resume and layout.distill_settings.is_file()
    if resuming and config.pathway == "trunk" and config.adapter_rank is None:
        # An unset rank resumes with the run's own, also for a run begun when the default rank was another (a copy:
        # the caller's config stays as given).
        saved_rank = read_json(layout.distill_settings).get("adapter_rank")
        config = dataclasses.replace(config, adapter_rank=saved_rank)
    teacher, tokenizer, teacher_config = load_model(config.teacher, device=device)
    # A Hugging Face teacher is named by its resolved "hf:PATH"; a kforcing one by its checkpoint directory.
    if isinstance(teacher, HFTeacher):
        teacher_id = teacher.source
    else:
        teacher_id = str(ckpt.resolve_checkpoint(config.teacher).resolve())
    provenance = ckpt.Provenance.from_config(teacher_config)
    if config.pathway != "full":
        if not is_teacher(teacher):
            raise DistillError(f"--pathway {config.pathway} needs an AR teacher; {teacher_id} is a "
                               f"{type(teacher).__name__}")
        check_draft_run(config, info)
        if config.pathway == "chain":
            config = dataclasses.replace(config, draft_vocab=_resolve_draft_vocab(config, teacher, layout, resuming))
    elif isinstance(teacher, HFTeacher):
        raise DistillError("--pathway full fine-tunes a copy of a kforcing teacher; a Hugging Face teacher stays "
                           "frozen: use --pathway chain or trunk")
    elif isinstance(teacher, PushForwardLM):
        if config.objective == "noise-inversion":
            raise DistillError("--objective noise-inversion needs an AR teacher (the CDF intervals are the AR "
                               f"model's); {teacher_id} is a K-Forcing student")
        start = 2 * teacher.max_k if config.objective == "self-forcing" else teacher.max_k + 1
        check_schedule(config.schedule, config.objective, start)
    else:
        check_schedule(config.schedule, config.objective, 1)
    seq_len = _context_length(config, teacher, provenance)
    if info.main:
        layout.root.mkdir(parents=True, exist_ok=True)
        _write_settings(config, layout, teacher_id, seq_len)
        if tokenizer is not None:
            tokenizer.save(layout.tokenizer)
    info.barrier()
    dataset = _token_cache(config, provenance, tokenizer, layout, info)
    if dataset.vocab_size > teacher.config.vocab_size:
        raise DistillError(f"the data's tokenizer has {dataset.vocab_size} tokens but the teacher's vocabulary has "
                           f"{teacher.config.vocab_size}: the corpus was tokenised with another tokenizer")
    run = _run_schedule if config.pathway == "full" else _run_draft_schedule
    return run(config, teacher, teacher_id, dataset, tokenizer, seq_len, layout, info, device)


def _finished_stage(stage_layout: RunLayout, k: int) -> dict:
    summary = read_json(stage_layout.done)
    if not (stage_layout.final / "config.json").is_file():
        raise ckpt.CheckpointError(f"{stage_layout.done} marks stage k={k} finished but {stage_layout.final} is not "
                                   f"a checkpoint; delete {stage_layout.root} to redo the stage")
    return summary


def _run_schedule(config, teacher, teacher_dir, dataset, tokenizer, seq_len, layout, info, device) -> dict:
    ar_teacher = teacher if isinstance(teacher, ARModel) else None
    stage_teacher, stage_teacher_dir = teacher, teacher_dir

    def train(index, k, steps, stage_layout, steps_before):
        stage = Stage(index, k, steps, stage_layout, stage_teacher, ar_teacher, stage_teacher_dir)
        return run_stage(config, stage, dataset, tokenizer, seq_len, info, device, steps_before)

    def finished(stage_layout):  # the next stage's teacher: this stage's student
        nonlocal stage_teacher, stage_teacher_dir
        stage_teacher, _, _ = load_model(stage_layout.final, device=device, with_tokenizer=False)
        stage_teacher_dir = str(stage_layout.final.resolve())

    return _schedule_loop(config, layout, info, seq_len, train, finished)


def _run_draft_schedule(config, teacher, teacher_dir, dataset, tokenizer, seq_len, layout, info, device) -> dict:
    """The stages of a draft student: one head grows through the schedule's k, on the same frozen teacher."""
    torch.manual_seed(config.seed)  # the head's new noise encoder
    try:
        student = DraftStudent.from_teacher(teacher, config.head_config())
    except ValueError as error:  # settings that only the teacher's shape rules out (e.g. adapter_rank > width)
        raise DistillError(str(error)) from None
    if config.draft_vocab:  # the training text's most frequent tokens
        student.head.set_draft_vocab(np.bincount(dataset.split("train"), minlength=student.config.vocab_size))

    def train(index, k, steps, stage_layout, steps_before):
        return run_draft_stage(config, student, index, k, steps, stage_layout, dataset, tokenizer, seq_len, info,
                               device, steps_before, teacher_dir)

    def finished(stage_layout):  # the next stage continues from this stage's exported (EMA) head
        ckpt.load_weights(student.head, stage_layout.final)

    return _schedule_loop(config, layout, info, seq_len, train, finished)


def _schedule_loop(config, layout, info, seq_len, train, finished) -> dict:
    """Run the stages in order: a finished stage is kept, `train(index, k, steps, stage layout, steps before)`
    runs the others (None: stop_after ended the run inside it); `finished(stage layout)` hands a stage's export
    to the next one."""
    summaries, steps_before = [], 0
    for index, (k, steps) in enumerate(zip(config.schedule, config.stage_steps())):
        stage_layout = layout.stage(k)
        if stage_layout.done.is_file():
            summary = _finished_stage(stage_layout, k)
        elif config.stop_after is not None and steps_before >= config.stop_after:
            break
        else:
            summary = train(index, k, steps, stage_layout, steps_before)
            if summary is None:  # stopped mid-stage (stop_after)
                break
        summaries.append(summary)
        steps_before += summary["steps_budget"]
        finished(stage_layout)
        if info.main:
            ckpt.write_latest(layout.root, stage_layout.final, summary["step"])
        info.barrier()
    final = None
    if summaries and len(summaries) == len(config.schedule):
        final = str(layout.stage(config.schedule[-1]).final)
    return {"stages": summaries, "checkpoint": final, "out_dir": str(layout.root), "seq_len": seq_len}


__all__ = ["DistillConfig", "DistillError", "OBJECTIVES", "PATHWAYS", "PushForwardStageTask", "Stage",
           "check_schedule", "distill", "parse_tau", "plateaued", "run_stage"]
