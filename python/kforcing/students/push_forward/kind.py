"""The push-forward student as a `StudentKind` (`kforcing distill --pathway full`, docs/method.md §4-§6): every
weight of a copy of the teacher fine-tuned so that hint rows emit k tokens per pass, distilled progressively."""

from pathlib import Path
from typing import Dict

import torch

from ...checkpoints import checkpoint as ckpt
from ...decoding.generate import generate_kforcing
from ...evaluation.metrics import EvalError, check_compatible
from ...models.transformer import cast_linear_weights
from ...teachers.hf_teacher import HFTeacher
from ...training.schedule import check_schedule
from ...training.stage_task import DistillError
from ..protocol import StudentKind
from .checkpoint import build_push_forward
from .distill import run_schedule
from .evaluate import evaluate_push_forward
from .model import PushForwardLM
from .report import plot_push_forward, push_forward_tables


class PushForwardKind(StudentKind):
    name = "pushforward"
    title = "push-forward student"
    pathways = ("full",)
    model_class = PushForwardLM
    options = {"objective": "self-forcing"}
    default_schedule = [1, 2, 4]

    def load(self, directory: Path, config: dict, teacher=None, device="cpu"):
        model, tokenizer, _ = ckpt.load_built_model(directory, config, build_push_forward, device)
        return model, tokenizer

    def build(self, spec: dict):
        return build_push_forward(spec)

    def configure(self, config) -> None:
        check_schedule(config.schedule, config.objective, start=None)
        config.tau = config.tau or (1.0, 1.0)

    def check_run(self, config, teacher, teacher_id: str, info) -> None:
        if isinstance(teacher, HFTeacher):
            raise DistillError("--pathway full fine-tunes a copy of a kforcing teacher; a Hugging Face teacher stays "
                               "frozen: use --pathway chain or trunk")
        if isinstance(teacher, PushForwardLM):  # a student continues its schedule
            if config.objective == "noise-inversion":
                raise DistillError("--objective noise-inversion needs an AR teacher (the CDF intervals are the AR "
                                   f"model's); {teacher_id} is a K-Forcing student")
            start = 2 * teacher.max_k if config.objective == "self-forcing" else teacher.max_k + 1
            check_schedule(config.schedule, config.objective, start)
        else:
            check_schedule(config.schedule, config.objective, 1)

    def distill(self, run) -> dict:
        return run_schedule(run)

    def generate(self, student, prompts, max_new_tokens: int, *, k=None, seed=0, temperature=1.0, top_k=0,
                 top_p=1.0, order="vocab", verify=False, freq_penalty=0.0, eos_id=None, pad_id=0, sequence_ids=None):
        if verify:
            raise ValueError("verification needs teacher-exact token rows, which a push-forward student does not "
                             "have (its token rows are fine-tuned): distil a draft student (distill --pathway chain, "
                             "head or trunk) to decode losslessly")
        if top_k or top_p < 1.0 or order != "vocab":
            raise ValueError("top-k, top-p and the CDF order apply to AR teachers and draft students; a push-forward "
                             "student decodes by argmax")
        return generate_kforcing(student, prompts, max_new_tokens, k=k, seed=seed, temperature=temperature,
                                 freq_penalty=freq_penalty, eos_id=eos_id, pad_id=pad_id, sequence_ids=sequence_ids)

    def store_weights(self, student, dtype, draft_dtype) -> None:
        if dtype == torch.bfloat16:
            cast_linear_weights(student, torch.bfloat16)

    def check_eval(self, config, models) -> None:
        check_compatible(models.teacher, models.student, models.tokenizer, models.student_tokenizer)
        if config.top_k or (config.top_p or 1.0) < 1.0 or config.cdf_order not in (None, "vocab"):
            raise EvalError("--top-k/--top-p/--cdf-order apply to draft students; a push-forward student samples "
                            "the full distribution at its temperature in vocabulary order")

    def trained_sampling(self, provenance) -> dict:
        return {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "order": "vocab"}

    def evaluate(self, config, models, dataset, prompts, results: dict) -> dict:
        return evaluate_push_forward(config, models, dataset, prompts, results)

    def eval_tables(self, results: dict) -> str:
        return push_forward_tables(results)

    def plot_eval(self, results: dict, out: Path) -> Dict[str, Path]:
        return plot_push_forward(results, out)


__all__ = ["PushForwardKind"]
