"""Load any model kforcing can name, by its path: the one entry point of `kforcing sample`, `distill` and `eval`.

    a checkpoint or run directory   a teacher (`kforcing.checkpoints.checkpoint`), or a student of any kind, loaded by
                                    its kind (`kforcing.students.registry`; a draft student with its teacher)
    "hf:PATH" (or "hf:HUB_NAME")    a Hugging Face causal LM as a teacher (`kforcing.teachers.hf_teacher`)
"""

from typing import Optional

import torch

from ..checkpoints.checkpoint import CheckpointError, build_ar_model, load_ar_model, read_config, resolve_checkpoint
from ..students.registry import kind_named, student_kinds
from ..teachers.hf_teacher import is_hf_spec, load_hf_teacher


def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None, with_tokenizer: bool = True,
               teacher=None):
    """(model in eval mode, tokenizer or None, config dict) from a checkpoint or run directory, or a Hugging Face
    model "hf:PATH" (an `HFTeacher`, with the tokenizer.json of its folder; its config dict is empty).

    A student loads through its kind. A draft student loads with its teacher: `teacher` (a teacher model, a
    checkpoint path or "hf:PATH") when given, else the teacher embedded in a merged export, else the one its
    provenance names (see `kforcing.students.draft.checkpoint`).
    """
    if is_hf_spec(path):
        model, tokenizer = load_hf_teacher(path, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
        return model, tokenizer, {}
    directory = resolve_checkpoint(path)
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type == "ar":
        return load_ar_model(directory, config, device, dtype, with_tokenizer)
    try:
        kind = kind_named(model_type)
    except KeyError:
        known = ", ".join(["ar"] + [kind.name for kind in student_kinds()])
        raise CheckpointError(f"checkpoint {directory} (version {config.get('version')}) holds a model of type "
                              f"{model_type!r}, which this kforcing does not know (it knows {known})") from None
    model, tokenizer = kind.load(directory, config, teacher=teacher, device=device)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), tokenizer if with_tokenizer else None, config


def build_model(spec: dict):
    """An untrained model from `export_config()`'s dict (the config.json of a checkpoint): an AR model, or a student
    whose kind builds from its config alone (a push-forward student; a draft student needs its teacher: load it)."""
    if not isinstance(spec, dict) or "model_type" not in spec or "model" not in spec:
        raise ValueError("a model spec needs 'model_type' and 'model' keys (is this a kforcing checkpoint?)")
    if spec["model_type"] == "ar":
        return build_ar_model(spec)
    try:
        kind = kind_named(spec["model_type"])
    except KeyError as error:
        raise ValueError(f"unknown model_type {spec['model_type']!r}: {error.args[0]}") from None
    return kind.build(spec)


__all__ = ["build_model", "load_model"]
