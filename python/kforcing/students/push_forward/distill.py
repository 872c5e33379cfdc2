"""Distillation of a push-forward student (`kforcing distill --pathway full`, docs/method.md §5).

    kforcing distill --teacher runs/teacher --pathway full --schedule 1,2,4 --out runs/student
    torchrun --nproc_per_node 8 -m kforcing.cli distill --teacher runs/teacher --pathway full --out runs/student

What each stage learns (targets, loss) is `kforcing.students.push_forward.targets`. Each stage's student
(`PushForwardLM.from_teacher`) starts from its teacher's weights (for an AR teacher only the noise encoder is new) and
is trained by the shared loop of `kforcing.training.trainer`, with an exponential moving average of its weights: the
EMA is what is evaluated, exported and used as the next stage's teacher. The teacher passes that make targets always
run in float32 (the tokens must be the teacher's decode-time tokens).

Steps per stage are fixed (`steps`), or with `plateau_patience` a stage also ends early when the validation
exact match (against the stage's targets) has not improved by `plateau_delta` over the last `plateau_patience`
evaluations. The cosine schedule always spans `steps`.
"""

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ...checkpoints import checkpoint as ckpt
from ...checkpoints.checkpoint import RunLayout
from ...data import TokenDataset, heldout_contexts
from ...models.transformer import ARModel
from ...runtime import write_json_atomic
from ...training.batch_noise import batch_noise
from ...training.schedule import DistillRun, run_stages
from ...training.stage_task import DistillError, StageTask
from ...training.trainer import DistInfo, Trainer
from .checkpoint import load_push_forward
from .evaluate import coupled_agreement
from .model import PushForwardLM
from .targets import ar_targets, noise_inversion_batch, self_forcing_targets, window_loss

_VAL_OFFSET = 1 << 40  # sample keys of validation batches start here (training keys stay far below)


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

    def __init__(self, config, stage: Stage, dataset: TokenDataset, seq_len: int, info: DistInfo,
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


def _check_stage_teacher(config, stage: Stage):
    if config.objective != "self-forcing":
        return
    if isinstance(stage.teacher, PushForwardLM):
        if stage.teacher.max_k < stage.k // 2:
            raise DistillError(f"stage k={stage.k} needs a teacher with max_k >= {stage.k // 2}, got "
                               f"max_k={stage.teacher.max_k}")
    elif stage.k != 1:
        raise DistillError(f"self-forcing stage k={stage.k} needs a K-Forcing teacher; an AR teacher only starts k=1")


def run_stage(config, stage: Stage, dataset: TokenDataset, tokenizer, seq_len: int, info: DistInfo,
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


def run_schedule(run: DistillRun) -> dict:
    """Every stage of the schedule: each stage's student is the next stage's teacher."""
    config, teacher, dataset, tokenizer, seq_len, info, device = (run.config, run.teacher, run.dataset, run.tokenizer,
                                                                  run.seq_len, run.info, run.device)
    ar_teacher = teacher if isinstance(teacher, ARModel) else None
    stage_teacher, stage_teacher_dir = teacher, run.teacher_id

    def train(index, k, steps, stage_layout, steps_before):
        stage = Stage(index, k, steps, stage_layout, stage_teacher, ar_teacher, stage_teacher_dir)
        return run_stage(config, stage, dataset, tokenizer, seq_len, info, device, steps_before)

    def finished(stage_layout):  # the next stage's teacher: this stage's student
        nonlocal stage_teacher, stage_teacher_dir
        stage_teacher = load_push_forward(stage_layout.final, device)
        stage_teacher_dir = str(stage_layout.final.resolve())

    return run_stages(run, train, finished)


__all__ = ["PushForwardStageTask", "Stage", "run_schedule", "run_stage"]
