"""Load any model kforcing can name, by its path: the one entry point of `kforcing sample`, `distill` and `eval`.

    a checkpoint or run directory   a teacher or push-forward student (`kforcing.checkpoints.checkpoint`), or a draft
                                    student with its teacher (`kforcing.checkpoints.draft_checkpoint`)
    "hf:PATH" (or "hf:HUB_NAME")    a Hugging Face causal LM as a teacher (`kforcing.teachers.hf_teacher`)
"""

from typing import Optional

import torch

from ..teachers.hf_teacher import is_hf_spec, load_hf_teacher
from .checkpoint import checkpoint_tokenizer, load_kforcing_model, read_config, resolve_checkpoint
from .draft_checkpoint import load_draft_student


def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None, with_tokenizer: bool = True,
               teacher=None):
    """(model in eval mode, tokenizer or None, config dict) from a checkpoint or run directory, or a Hugging Face
    model "hf:PATH" (an `HFTeacher`, with the tokenizer.json of its folder; its config dict is empty).

    A draft-student checkpoint loads as a `DraftStudent` with its teacher: `teacher` (a teacher model, a checkpoint
    path or "hf:PATH") when given, else the teacher embedded in a merged export, else the one its provenance names
    (see `kforcing.checkpoints.draft_checkpoint`).
    """
    if is_hf_spec(path):
        model, tokenizer = load_hf_teacher(path, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
        return model, tokenizer, {}
    directory = resolve_checkpoint(path)
    config = read_config(directory)
    if config.get("model_type") == "draft":
        student = load_draft_student(directory, config, teacher, device)
        if dtype is not None:
            student.to(dtype)
        return student.eval(), checkpoint_tokenizer(directory, with_tokenizer), config
    return load_kforcing_model(directory, config, device, dtype, with_tokenizer)


__all__ = ["load_model"]
