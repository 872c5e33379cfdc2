"""Distillation of a draft student: the frozen teacher plus trained hint rows (`distill --pathway head|trunk`).

    kforcing distill --teacher runs/teacher --pathway head --tau 0.7 --top-k 50 --top-p 0.9 --out runs/draft

The teacher never changes: only the head trains (docs/method.md §8), on the targets of `kforcing.training.head_targets`
at the sampling settings the student will be verified with (temperature = --tau, --top-k, --top-p). The schedule grows k
progressively (e.g. 2,4: the same head first drafts one token per window, then three); the default is one stage at
k = 4. Each stage runs the shared loop of `kforcing.training.trainer` over the head's parameters, with an EMA of them that
is what is evaluated and exported.

Run directory: as a progressive distillation (`kforcing.training.distill`), with one stage_kK per stage; a stage's
final/ is a draft checkpoint (`kforcing.checkpoints.draft_checkpoint`: the head and the teacher's fingerprint, not the
teacher). Each validation logs the loss, the acceptance per draft offset and the tokens per pass the head's drafts would
earn on held-out windows; the start and the end of a stage also run verified decoding
(`kforcing.decoding.draft_decode.generate_with_drafts`) on held-out prompts and log its measured tokens per pass.
"""

from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import RunLayout
from ..checkpoints.draft_checkpoint import save_draft_student
from ..data import TokenDataset, heldout_contexts
from ..decoding.draft_decode import generate_with_drafts
from ..runtime import write_json_atomic
from ..students.draft_student import DraftStudent
from .head_targets import chain_step, head_step
from .stage_task import DistillError, StageTask
from .targets import batch_noise, boundary_draws
from .trainer import DistInfo, Trainer

VERIFY_NEW_TOKENS = 32  # tokens each held-out prompt decodes when a stage measures verified tokens per pass
_VAL_OFFSET = 1 << 40  # sample keys of validation batches start here (training keys stay far below)


class DraftTask(StageTask):
    """The loss, validation and verified-decoding measurement of one stage of a draft student."""

    unit = "windows"
    bar_stats = {"tpp": "train_tokens_per_pass"}
    plateau_metric = "val_tokens_per_pass"

    def __init__(self, config, student: DraftStudent, index: int, k: int, dataset: TokenDataset, seq_len: int,
                 info: DistInfo, device, teacher_checkpoint: str):
        super().__init__(config, dataset, seq_len, k, teacher_checkpoint)
        self.student, self.index, self.info, self.device = student, index, info, device
        self.sampling = config.sampling()
        self.global_batch = config.batch_size * config.grad_accum
        self.units_per_step = self.global_batch * seq_len
        self.name = f"distill {config.pathway} k={k}"
        if config.pathway == "chain":  # its training step measures the first draft only (teacher-forced)
            self.bar_stats = {"acc2": "train_accept_2"}
        self.prompts = []
        if config.ar_eval_contexts:
            max_len = min(seq_len, student.config.max_seq_len - VERIFY_NEW_TOKENS - 2 * k)
            self.prompts = heldout_contexts(dataset, config.ar_eval_contexts, max_len=max_len, seed=config.seed)

    def batch(self, split, step, first, sample_keys):
        """(contexts (B, N), uniforms (B, N, k)) of one micro-batch: pure functions of the step and sample keys."""
        config = self.config
        ids, _ = self.dataset.batch(split, step, len(sample_keys), self.seq_len,
                                    config.seed + 104729 * (self.index + 1), first_index=first, device=self.device)
        u, _ = batch_noise(config.seed, self.index, sample_keys, self.seq_len, self.k, config.tau)
        return ids, u

    def loss(self, module, step, first_index):
        keys = step * self.global_batch + first_index + torch.arange(self.config.batch_size, device=self.device)
        ids, u = self.batch("train", step, first_index, keys)
        boundary = None
        if self.config.boundary_beta is not None:
            boundary = boundary_draws(self.config.seed, self.index, int(keys[0]), u.shape, self.config.boundary_beta,
                                      u.device)
        if self.student.pathway == "chain":
            loss, metrics = chain_step(self.student, ids, u, self.sampling)
        else:
            loss, metrics = head_step(self.student, ids, u, self.sampling, self.config.windows, boundary)
        record = {f"train_accept_{j + 2}": value for j, value in enumerate(metrics["acceptance"])}
        if "tokens_per_pass" in metrics:
            record["train_tokens_per_pass"] = metrics["tokens_per_pass"]
        return loss, record

    def _eval_student(self, head) -> DraftStudent:
        return DraftStudent(self.student.teacher, head, self.student.fingerprint)

    @torch.no_grad()
    def validate(self, step, head):
        """Loss, per-offset acceptance and tokens per pass of the head's drafts on validation windows."""
        student, config = self._eval_student(head), self.config
        sums = torch.zeros(2 + self.k - 1, dtype=torch.float64)
        for i in range(config.eval_batches):
            keys = _VAL_OFFSET + i * config.batch_size + torch.arange(config.batch_size, device=self.device)
            ids, u = self.batch("val", i, i * config.batch_size, keys)
            with self.autocast():
                if student.pathway == "chain":  # the chain k-1 drafts deep, as decoding runs it
                    loss, metrics = chain_step(student, ids, u, self.sampling, rollout=True)
                else:
                    loss, metrics = head_step(student, ids, u, self.sampling, config.windows)
            sums += torch.tensor([loss.item(), metrics["tokens_per_pass"], *metrics["acceptance"]])
        means = (sums / config.eval_batches).tolist()
        record = {"step": step, "val_loss": means[0], "val_tokens_per_pass": means[1]}
        record.update({f"val_accept_{j + 2}": value for j, value in enumerate(means[2:])})
        return record

    def teacher_measurement(self, head) -> dict:
        """Tokens per pass and acceptance of verified decoding on the held-out prompts (measured, not predicted)."""
        if not self.prompts:
            return {}
        sampling, results = self.sampling, []
        for first in range(0, len(self.prompts), self.config.batch_size):
            chunk = self.prompts[first:first + self.config.batch_size]
            out = generate_with_drafts(self._eval_student(head).eval(), chunk,
                                       VERIFY_NEW_TOKENS, k=self.k, seed=self.config.seed, **vars(sampling))
            results.append((out.tokens_per_pass, out.accepted))
        record = {"verified_tokens_per_pass": sum(r[0] for r in results) / len(results)}
        for j in range(self.k - 1):
            record[f"verified_accept_{j + 2}"] = sum(r[1][j] for r in results) / len(results)
        return record


def run_draft_stage(config, student: DraftStudent, index: int, k: int, steps: int, layout: RunLayout,
                    dataset: TokenDataset, tokenizer, seq_len: int, info: DistInfo, device, steps_before: int,
                    teacher_checkpoint: str) -> Optional[dict]:
    """Train the head for one stage; returns its summary, or None when stop_after ended the run inside it.

    The head's EMA weights (the stage's export) are left in `student.head` for the next stage.
    """
    task = DraftTask(config, student, index, k, dataset, seq_len, info, device, teacher_checkpoint)
    stop_at = steps if config.stop_after is None else min(steps, config.stop_after - steps_before)
    peak = config.effective_lr(student.config)
    student.head.train()
    trainer = Trainer(task, student.head, config, layout, info, device, steps, stop_at, peak, tokenizer=tokenizer,
                      scaled_prefix="noise.", lr_scale=config.noise_lr_scale, ema_decay=config.ema_decay)
    start = ckpt.find_resume_checkpoint(layout.root)
    if start is not None:
        if not config.resume:
            raise DistillError(f"{layout.root} holds a training checkpoint; pass --resume to continue it")
        trainer.resume(start)
    was_plateaued = trainer.run()
    if trainer.step < steps and not was_plateaued:
        return None
    summary = {"k": k, "pathway": config.pathway, "readout": config.readout, "windows": config.windows,
               "boundary_beta": config.boundary_beta,
               "steps_budget": steps, "seq_len": seq_len, "global_batch": task.global_batch, "lr": peak,
               "initial": task.initial, **task.records, "train_loss": trainer.last.get("train_loss"),
               "step": trainer.step, "plateaued": was_plateaued, "windows_seen": trainer.step * task.units_per_step,
               "tokens": trainer.step * task.global_batch * seq_len}
    student.head.load_state_dict(trainer.eval_model().state_dict())
    student.head.eval()
    provenance = task.provenance(trainer.step, {key: v for key, v in summary.items() if key != "initial"})
    save_draft_student(layout.final, student, tokenizer, provenance=provenance)
    write_json_atomic(layout.done, summary)
    return summary


def check_draft_run(config, info: DistInfo):
    """Raise DistillError for settings a draft student's distillation does not support."""
    if info.enabled or (dist.is_available() and dist.is_initialized()):
        raise DistillError(f"--pathway {config.pathway} trains on one process (its head is small); run it without "
                           "torchrun")
    if config.compile:
        raise DistillError(f"--compile is not supported with --pathway {config.pathway}: the head's step runs the "
                           "frozen teacher between its own passes")
    low, high = config.tau
    if low != high:
        raise DistillError(f"--pathway {config.pathway} learns one sampling distribution: give --tau one "
                           f"temperature (the one you will sample with), not the range {low}:{high}")


__all__ = ["DraftTask", "VERIFY_NEW_TOKENS", "check_draft_run", "run_draft_stage"]
