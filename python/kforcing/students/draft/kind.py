"""The draft student as a `StudentKind` (`kforcing distill --pathway chain|head|trunk`, docs/method.md §8): the
frozen teacher plus a trained head whose drafts the teacher verifies, so that its token rows stay the teacher's own
and verified decoding equals AR sampling token for token."""

import dataclasses
from pathlib import Path
from typing import Dict, Optional

import torch

from ...checkpoints import checkpoint as ckpt
from ...evaluation.metrics import EvalError
from ...models.transformer import cast_linear_weights
from ...teachers.protocol import is_teacher
from ...training.stage_task import DistillError
from ..protocol import StudentKind
from .checkpoint import load_draft_student, trained_sampling
from .decode import generate_with_drafts
from .distill import check_draft_run, configure_draft, resolve_draft_vocab, run_schedule
from .evaluate import evaluate_draft_student
from .report import draft_tables, plot_draft
from .student import DraftStudent


class DraftKind(StudentKind):
    name = "draft"
    title = "draft student"
    pathways = ("chain", "head", "trunk", "onepass")
    model_class = DraftStudent
    smallest_k = 2  # k counts the exact token: k = 2 is one draft a round
    decodes_with_teacher = True
    options = {"top_k": None, "top_p": None, "readout": None, "head_layers": None, "adapter_rank": None,
               "draft_vocab": None, "windows": "student", "cdf_order": "vocab", "noise_code": "sinusoid",
               "boundary_beta": None}
    default_schedule = [4]

    def load(self, directory: Path, config: dict, teacher=None, device="cpu"):
        student = load_draft_student(directory, config, teacher, device)
        return student.eval(), ckpt.checkpoint_tokenizer(directory, True)

    def configure(self, config) -> None:
        configure_draft(config)

    def check_run(self, config, teacher, teacher_id: str, info) -> None:
        if not is_teacher(teacher):
            raise DistillError(f"--pathway {config.pathway} needs an AR teacher; {teacher_id} is a "
                               f"{type(teacher).__name__}")
        check_draft_run(config, info)

    def prepare(self, config, teacher, saved: Optional[dict]):
        if saved is not None and config.pathway in ("trunk", "onepass") and config.adapter_rank is None:
            # An unset rank resumes with the run's own, also for a run begun when the default rank was another.
            config = dataclasses.replace(config, adapter_rank=saved.get("adapter_rank"))
        if config.pathway == "chain":
            config = dataclasses.replace(config, draft_vocab=resolve_draft_vocab(config, teacher, saved))
        return config

    def distill(self, run) -> dict:
        return run_schedule(run)

    def generate(self, student, prompts, max_new_tokens: int, *, k=None, seed=0, temperature=1.0, top_k=0,
                 top_p=1.0, order="vocab", verify=False, freq_penalty=0.0, eos_id=None, pad_id=0, sequence_ids=None):
        if freq_penalty:
            raise ValueError("a frequency penalty applies to push-forward students; a draft student samples its "
                             "teacher's distribution (verified, it is the teacher's own sample)")
        return generate_with_drafts(student, prompts, max_new_tokens, k=k, seed=seed, temperature=temperature,
                                    top_k=top_k, top_p=top_p, verify=verify, eos_id=eos_id, pad_id=pad_id,
                                    sequence_ids=sequence_ids, order=order)

    def store_weights(self, student, dtype, draft_dtype) -> None:
        if dtype == torch.bfloat16:  # the decoded model is the bf16-weight teacher, and its head drafts in bf16
            for part in (student.teacher, student.head):
                cast_linear_weights(part, torch.bfloat16)
        else:
            student.store_draft_weights(draft_dtype)

    def check_eval(self, config, models) -> None:
        if config.freq_penalty is not None:
            raise EvalError("--freq-penalty applies to push-forward students; a draft student's samples are never "
                            "penalised (verified decoding is the teacher's own sample)")

    def trained_sampling(self, provenance) -> dict:
        return vars(trained_sampling(provenance))

    def evaluate(self, config, models, dataset, prompts, results: dict) -> dict:
        return evaluate_draft_student(config, models, dataset, prompts, results)

    def eval_tables(self, results: dict) -> str:
        return draft_tables(results)

    def plot_eval(self, results: dict, out: Path) -> Dict[str, Path]:
        return plot_draft(results, out)


__all__ = ["DraftKind"]
