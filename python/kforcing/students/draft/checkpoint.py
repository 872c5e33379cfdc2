"""Checkpoints of draft students: the hint head's weights and the fingerprint of its teacher, never the teacher.

A draft-student checkpoint is a `kforcing.checkpoints.checkpoint` directory whose config.json has model_type "draft":

    model.safetensors     the HintHead's state dict (the only trained weights)
    config.json           "model": the teacher's ModelConfig, "head": the HeadConfig, "teacher_fingerprint": the
                          sha256 prefix of the teacher's config and weights (`teacher_fingerprint`), "provenance":
                          its `teacher` names the teacher checkpoint it was trained on
    teacher.safetensors   only in a merged export (`save_draft_student(..., merged=True)`): the teacher's weights,
                          so that the directory decodes on its own (kforcing teachers only)

A student of a Hugging Face teacher (`kforcing.students.draft.hf_adapters`) records "teacher_kind": "hf", the teacher's
shape as "model", and "hf:PATH" as its provenance's teacher: the teacher stays in its own folder and is loaded from
there.

Loading finds the teacher in this order: the one the caller passes, the embedded one of a merged export, the
checkpoint the provenance names. Whatever it is, its fingerprint must equal the recorded one: a head is only valid
on the exact teacher it was trained on, so another teacher (other weights, even a fine-tune of the same model) is a
`CheckpointError` that names both fingerprints.
"""

from pathlib import Path
from typing import List, Optional, Union

from ...checkpoints import checkpoint as ckpt
from ...checkpoints.checkpoint import CheckpointError, Provenance
from ...models.transformer import ARModel, ModelConfig
from ...teachers.hf_teacher import HFTeacher, is_hf_spec, load_hf_teacher
from ...teachers.protocol import is_teacher
from .student import DraftStudent, HeadConfig, Sampling, head_class, teacher_fingerprint

TEACHER_FILE = "teacher.safetensors"


def save_draft_student(directory, student: DraftStudent, tokenizer=None, provenance: Optional[Provenance] = None,
                       merged: bool = False) -> Path:
    """Write `student`'s head (and with merged=True its teacher's weights too) as a checkpoint directory."""
    tensors = None
    if merged and isinstance(student.teacher, HFTeacher):
        raise ValueError("a merged export embeds kforcing teachers only: a Hugging Face teacher stays in its own "
                         "folder (the checkpoint names it)")
    if merged:
        tensors = {TEACHER_FILE: {name: value.detach().to("cpu").contiguous()
                                  for name, value in student.teacher.state_dict().items()}}
    return ckpt.save_checkpoint(directory, student.head, tokenizer, provenance=provenance, tensors=tensors)


def _find_teacher(directory: Path, config: dict, teacher, device):
    """(the teacher model, its tokenizer or None when it was given as a model or is embedded)."""
    if is_teacher(teacher):
        return teacher, None
    if teacher is not None:
        path = teacher
    elif TEACHER_FILE in config.get("files", {}):
        model = ARModel(ModelConfig.from_dict(config["model"])).to(device)
        model.load_state_dict(ckpt.load_tensors(directory, TEACHER_FILE, device))
        return model.eval(), None
    else:
        provenance = Provenance.from_config(config)
        path = provenance.teacher if provenance is not None else None
        if path is None:
            raise CheckpointError(f"{directory} is a draft student without its teacher and names none; pass the "
                                  "teacher it was trained on (--teacher)")
        local = path[len("hf:"):] if is_hf_spec(path) else path
        if not Path(local).expanduser().exists():
            raise CheckpointError(f"{directory} was trained on the teacher {path}, which no longer exists; pass it "
                                  "(--teacher) from where it is now")
    if is_hf_spec(path):
        model, tokenizer = load_hf_teacher(path, device=device)
    else:
        teacher_directory = ckpt.resolve_checkpoint(path)
        teacher_config = ckpt.read_config(teacher_directory)
        if teacher_config.get("model_type") != "ar":
            raise CheckpointError(f"the teacher of a draft student must be an AR model; {path} holds a "
                                  f"{teacher_config.get('model_type')!r} model")
        model, tokenizer, _ = ckpt.load_ar_model(teacher_directory, teacher_config, device)
    if not is_teacher(model):
        raise CheckpointError(f"the teacher of a draft student must be an AR model; {path} is a "
                              f"{type(model).__name__}")
    return model, tokenizer


def load_draft_student(directory, config: dict, teacher: Union[None, str, Path, ARModel, HFTeacher] = None,
                       device="cpu") -> DraftStudent:
    """The DraftStudent of a draft checkpoint (see the module docstring), in eval mode."""
    directory = Path(directory)
    try:
        head_config = HeadConfig.from_dict(config["head"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory} (checkpoint version {config.get('version')}): unreadable head settings "
                              f"({error})") from None
    model, teacher_tokenizer = _find_teacher(directory, config, teacher, device)
    student_tokenizer = ckpt.checkpoint_tokenizer(directory, True)
    if None not in (teacher_tokenizer, student_tokenizer) and \
            teacher_tokenizer.fingerprint() != student_tokenizer.fingerprint():
        raise CheckpointError(f"{directory}/tokenizer.json differs from its teacher's tokenizer: a draft student "
                              "decodes with its teacher's vocabulary; restore the teacher's tokenizer.json")
    fingerprint = teacher_fingerprint(model)
    if fingerprint != config.get("teacher_fingerprint"):
        raise CheckpointError(f"{directory} was trained on a teacher with fingerprint "
                              f"{config.get('teacher_fingerprint')}, but the teacher given has fingerprint "
                              f"{fingerprint} (other weights or config): a hint head only fits the exact teacher it "
                              "was trained on")
    try:
        module = head_class(model, head_config.pathway)
    except ValueError as error:
        raise CheckpointError(f"{directory}: {error}") from None
    head = module.blank(model, head_config)
    head.to(device=model.device, dtype=model.dtype)
    head.teacher_fingerprint = fingerprint
    ckpt.load_weights(head, directory)
    student = DraftStudent(model, head, fingerprint).eval()
    student.measured_acceptance = _measured_acceptance(Provenance.from_config(config), head_config.max_k)
    return student


def _measured_acceptance(provenance: Optional[Provenance], max_k: int) -> Optional[List[float]]:
    """The verified acceptance of offsets 2..max_k its distillation's last validation measured, if recorded."""
    summary = (provenance.summary or {}) if provenance is not None else {}
    values = [summary.get(f"verified_accept_{j}") for j in range(2, max_k + 1)]
    if not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in values):
        return None
    return [float(v) for v in values]


def trained_sampling(provenance: Optional[Provenance]) -> Sampling:
    """The sampling settings a draft student was distilled with (its provenance's distill settings); the library
    defaults for what a provenance does not record."""
    settings = provenance.settings if provenance is not None and provenance.stage == "distill" else {}
    default = Sampling()
    tau = settings.get("tau") or [default.temperature]
    return Sampling(float(tau[0]), settings.get("top_k") or 0,
                    settings.get("top_p") if settings.get("top_p") is not None else default.top_p,
                    settings.get("cdf_order") or default.order)


__all__ = ["TEACHER_FILE", "load_draft_student", "save_draft_student", "trained_sampling"]
