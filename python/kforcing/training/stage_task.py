"""What every distillation stage's training task shares (`kforcing.workflows.distill`,
`kforcing.students.draft.distill`).

A stage validates at the start, every eval_interval steps and at the end; it may end early on a plateau of one
validation metric; at its start and end (and on a plateau) it adds a costlier measurement against the teacher; it
remembers its first record ("initial") and the latest value of every metric ("records") for its summary, and keeps
the plateau history in its checkpoints. `DistillError` is every distillation's settings error.
"""

import abc
from typing import Dict, List, Optional

from ..checkpoints.checkpoint import Provenance
from .trainer import TrainingTask


def plateaued(history: List[float], config, step: int) -> bool:
    """True when the last `plateau_patience` validations gained less than plateau_delta over the best before."""
    patience = config.plateau_patience
    if patience is None or step < config.min_steps or len(history) <= patience:
        return False
    return max(history[-patience:]) < max(history[:-patience]) + config.plateau_delta


class DistillError(ValueError):
    """The settings of a distillation (or the checkpoints it is given) cannot work together."""


class StageTask(TrainingTask):
    """Validation, plateau stop, summary records and provenance of one stage.

    Subclasses set `plateau_metric` (the validation metric whose plateau ends the stage) and implement `validate`
    and `teacher_measurement`.
    """

    plateau_metric = ""

    def __init__(self, config, dataset, seq_len: int, k: int, teacher_checkpoint: str):
        self.config, self.dataset, self.seq_len, self.k = config, dataset, seq_len, k
        self.teacher_checkpoint = teacher_checkpoint
        self.history: List[float] = []
        self.initial: Optional[dict] = None
        self.records: dict = {}  # every validation metric, latest value

    @abc.abstractmethod
    def validate(self, step: int, model) -> Dict:
        """The validation record ({"step", metrics...}) of `model` (the evaluated weights)."""

    @abc.abstractmethod
    def teacher_measurement(self, model) -> Dict:
        """The costlier metrics of the start, the end and a plateau ({} when there are none)."""

    def evaluate(self, step, phase, model):
        record = self.validate(step, model)
        stop = False
        if phase == "interval":
            self.history.append(record[self.plateau_metric])
            stop = plateaued(self.history, self.config, step)
        if phase != "interval" or stop:
            record.update(self.teacher_measurement(model))
        if phase == "start":
            self.initial = {key: value for key, value in record.items() if key != "step"}
        self.records.update({key: value for key, value in record.items() if key != "step"})
        return record, stop

    def provenance(self, step, summary=None):
        return Provenance("distill", step, str(self.dataset.directory.resolve()), self.seq_len, self.config.to_json(),
                          teacher=self.teacher_checkpoint, k=self.k, summary=summary)

    def state(self):
        return {"history": self.history, "k": self.k, "initial": self.initial}

    def load_state(self, state):
        self.history, self.initial = list(state["history"]), state.get("initial")


__all__ = ["DistillError", "StageTask", "plateaued"]
