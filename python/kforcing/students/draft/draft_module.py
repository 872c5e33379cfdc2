"""What every trainable module of a draft student shares: its checkpoint record and its blank construction.

`HintHead`, `TrunkAdapters`, `ChainHead` and `HFTrunkAdapters` subclass `DraftModule`; each sets `config` (its
`kforcing.students.draft.student.HeadConfig`), `model_config` (the teacher's config: a kforcing `ModelConfig`, or a
Hugging Face teacher's `HFModelConfig`) and `teacher_fingerprint` (set by the `DraftStudent` that holds it).
"""

from torch import nn

from ...models.transformer import ModelConfig


class DraftModule(nn.Module):
    """The base of a draft student's trainable module (module docstring)."""

    def export_config(self) -> dict:
        """What a checkpoint's config.json records (`kforcing.checkpoints.checkpoint`): the teacher's shape
        ("teacher_kind": "hf" for a Hugging Face teacher), the module's settings and the fingerprint of the teacher it
        was trained on."""
        kind = {} if isinstance(self.model_config, ModelConfig) else {"teacher_kind": "hf"}
        return {"model_type": "draft", **kind, "model": self.model_config.to_dict(), "head": self.config.to_dict(),
                "teacher_fingerprint": self.teacher_fingerprint}

    @classmethod
    def blank(cls, teacher, config):
        """An untrained module for `teacher` (its weights are about to be loaded from a checkpoint)."""
        return cls(teacher.config, config)


__all__ = ["DraftModule"]
