"""Distillation of a draft student: the frozen teacher plus a trained draft module
(`distill --pathway chain|head|trunk|onepass`).

    kforcing distill --teacher runs/teacher --pathway head --tau 0.7 --top-k 50 --top-p 0.9 --out runs/draft

The teacher never changes: only the head trains (docs/method.md §8), on the targets of `kforcing.students.draft.targets`
at the sampling settings the student will be verified with (temperature = --tau, --top-k, --top-p). The schedule grows k
progressively (e.g. 2,4: the same head first drafts one token per window, then three); the default is one stage at
k = 4. Each stage runs the shared loop of `kforcing.training.trainer` over the head's parameters, with an EMA of them
that is what is evaluated and exported.

Run directory: as a progressive distillation (`kforcing.workflows.distill`), with one stage_kK per stage; a stage's
final/ is a draft checkpoint (`kforcing.students.draft.checkpoint`: the head and the teacher's fingerprint, not the
teacher). Each validation logs the loss, the acceptance per draft offset and the tokens per pass the head's drafts would
earn on held-out windows; the start and the end of a stage also run verified decoding
(`kforcing.students.draft.decode.generate_with_drafts`) on held-out prompts and log its measured tokens per pass.
"""

import math
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ...checkpoints import checkpoint as ckpt
from ...checkpoints.checkpoint import RunLayout
from ...data import TokenDataset, heldout_contexts
from ...runtime import write_json_atomic
from ...training.batch_noise import batch_noise, boundary_draws
from ...training.schedule import DistillRun, check_schedule, run_stages
from ...training.stage_task import DistillError, StageTask
from ...training.trainer import DistInfo, Trainer
from .checkpoint import save_draft_student
from .decode import generate_with_drafts
from .student import DraftStudent, HeadConfig, Sampling
from .targets import chain_step, head_step

# The chain student's default draft vocabulary: V / DRAFT_VOCAB_SHARE tokens from DRAFT_VOCAB_MIN_VOCAB up (see
# resolve_draft_vocab).
DRAFT_VOCAB_SHARE, DRAFT_VOCAB_MIN_VOCAB = 8, 8192
CHAIN_HEAD_LAYERS = 1  # the chain head's default depth: one copy of the teacher's last block
# The distribution a draft student learns unless told otherwise: truncated sampling, what users sample with; the
# ablation in bench/results/ablation_draft_cpu compares it with temperature 1 over the whole vocabulary.
DRAFT_SAMPLING = dict(temperature=0.7, top_k=50, top_p=0.9)
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
        self.sampling = distill_sampling(config)
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


# ---------------------------------------------------------------------------------------------------------
# Settings and the run


def configure_draft(config):
    """Fill a draft pathway's defaults into a DistillConfig and check its settings (DistillError)."""
    config.tau = config.tau or (DRAFT_SAMPLING["temperature"],) * 2
    config.readout = config.readout or HeadConfig.readout
    config.top_k = DRAFT_SAMPLING["top_k"] if config.top_k is None else config.top_k
    config.top_p = DRAFT_SAMPLING["top_p"] if config.top_p is None else config.top_p
    other = {"head": [("adapter_rank", config.adapter_rank, None)],
             "trunk": [("head_layers", config.head_layers, None)],
             "onepass": [("head_layers", config.head_layers, None)],
             "chain": [("adapter_rank", config.adapter_rank, None), ("windows", config.windows, "student"),
                       ("noise_code", config.noise_code, "sinusoid")]}[config.pathway]
    for name, value, default in other:
        if value != default:
            raise DistillError(f"--{name.replace('_', '-')} does not apply to --pathway {config.pathway}")
    default_layers = CHAIN_HEAD_LAYERS if config.pathway == "chain" else HeadConfig.num_layers
    config.head_layers = default_layers if config.head_layers is None else config.head_layers
    check_schedule(config.schedule, "growth", start=2)
    if (config.pathway, config.readout) == ("trunk", "categorical") and config.schedule[0] < 3:
        # the trunk's categorical draft of token 2 is the teacher's own row: exact, nothing to learn
        raise DistillError(f"schedule {list(config.schedule)}: a categorical trunk student drafts token 2 with the "
                           "teacher's own row, so it has nothing to train below k = 3 (start at k >= 3)")
    if config.boundary_beta is not None:
        if not 0.0 < config.boundary_beta < math.inf:
            raise DistillError(f"--boundary-beta must be positive and finite, got {config.boundary_beta}")
        if (config.readout, config.windows) != ("onehot", "teacher"):
            raise DistillError(f"--boundary-beta needs --readout onehot --windows teacher (got --readout "
                               f"{config.readout} --windows {config.windows}): a categorical row never sees its own "
                               "uniform, and the tokens of the student's own windows depend on the uniforms")
    if config.draft_vocab is not None and config.draft_vocab != 0 and config.draft_vocab < 2:
        raise DistillError(f"--draft-vocab must be 0 (the whole vocabulary) or at least 2 tokens, got "
                           f"{config.draft_vocab}")
    if config.top_k < 0 or not 0.0 < config.top_p <= 1.0:
        raise DistillError(f"top_k must be >= 0 and top_p in (0, 1], got {config.top_k} and {config.top_p}")
    try:
        head_config(config)
    except ValueError as error:
        raise DistillError(str(error)) from None

def head_config(config) -> HeadConfig:
    """The hint head a draft pathway trains (max_k: the schedule's largest k)."""
    return HeadConfig(num_layers=config.head_layers, max_k=max(config.schedule), readout=config.readout,
                      pathway=config.pathway, adapter_rank=config.adapter_rank, noise_code=config.noise_code,
                      draft_vocab=config.draft_vocab or None)

def distill_sampling(config) -> Sampling:
    """The sampling distribution a draft pathway's head learns: --tau, --top-k, --top-p, --cdf-order."""
    return Sampling(config.tau[0], config.top_k, config.top_p, config.cdf_order)


def resolve_draft_vocab(config, teacher, saved: Optional[dict]) -> int:
    """A chain student's --draft-vocab as a number (0: the whole vocabulary): as given; left at the default, the
    run's own when resuming (`saved`: its distill.json; 0 for a run written before the default existed), else V /
    DRAFT_VOCAB_SHARE for vocabularies of DRAFT_VOCAB_MIN_VOCAB tokens or more
    (bench/results/draft_small_cpu/draft_vocab/: on the small preset, V = 8192, it decodes faster at the same
    acceptance) and the whole vocabulary below (on the tiny one a restricted vocabulary lowered acceptance and saved
    nothing: docs/students.md)."""
    if config.draft_vocab is not None:
        return config.draft_vocab
    if saved is not None:
        return 0 if saved.get("draft_vocab") is None else int(saved["draft_vocab"])
    vocab = teacher.config.vocab_size
    return vocab // DRAFT_VOCAB_SHARE if vocab >= DRAFT_VOCAB_MIN_VOCAB else 0


def run_schedule(run: DistillRun) -> dict:
    """The stages of a draft student: one head grows through the schedule's k, on the same frozen teacher."""
    config = run.config
    torch.manual_seed(config.seed)  # the head's new noise encoder
    try:
        student = DraftStudent.from_teacher(run.teacher, head_config(config))
    except ValueError as error:  # settings that only the teacher's shape rules out (e.g. adapter_rank > width)
        raise DistillError(str(error)) from None
    if config.draft_vocab:  # the training text's most frequent tokens
        student.head.set_draft_vocab(np.bincount(run.dataset.split("train"), minlength=student.config.vocab_size))

    def train(index, k, steps, stage_layout, steps_before):
        return run_draft_stage(config, student, index, k, steps, stage_layout, run.dataset, run.tokenizer,
                               run.seq_len, run.info, run.device, steps_before, run.teacher_id)

    def finished(stage_layout):  # the next stage continues from this stage's exported (EMA) head
        ckpt.load_weights(student.head, stage_layout.final)

    return run_stages(run, train, finished)


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


__all__ = ["CHAIN_HEAD_LAYERS", "DRAFT_SAMPLING", "DRAFT_VOCAB_MIN_VOCAB", "DRAFT_VOCAB_SHARE", "DraftTask",
           "VERIFY_NEW_TOKENS", "check_draft_run", "configure_draft", "distill_sampling", "head_config",
           "resolve_draft_vocab", "run_draft_stage", "run_schedule"]
