"""The Student protocol: everything the library's workflows need from one kind of student.

`kforcing.workflows` (distill, eval, report, loading) and the CLI never name a student class. They look the kind
up in `kforcing.students.registry` (by `kforcing distill --pathway`, by a checkpoint's model_type, or by the model
they hold) and call it through this interface:

    checkpoints   load(directory, config, teacher, device) -> (student, tokenizer), build(spec)
    distillation  options, default_schedule, configure(config), check_run(config, teacher, teacher_id, info),
                  prepare(config, teacher, saved), distill(run)
    decoding      generate(student, prompts, max_new_tokens, ...), store_weights(student, dtype, draft_dtype)
    evaluation    check_eval(config, models), trained_sampling(provenance), evaluate(config, models, dataset,
                  prompts, results)
    reports       eval_tables(results), plot_eval(results, out)

A kind implements each with its own modules (its model, targets, stage task, decoding, checkpoint format, eval and
report rows) on top of the generic machinery below it: the trainer and the stage loop (`kforcing.training`), the
checkpoint files (`kforcing.checkpoints`), the AR decoder (`kforcing.decoding`) and the measurements
(`kforcing.evaluation`). Adding a student is one new package in students/ with a kind, listed in the registry.

`config` is a `kforcing.workflows.distill.DistillConfig` in the distillation methods and a
`kforcing.workflows.evaluate.EvalConfig` in the evaluation ones; `models` is that module's `Models` (teacher,
student, tokenizer, provenances, optional reference).
"""

import abc
from pathlib import Path
from typing import Dict, List, Optional, Tuple


class StudentKind(abc.ABC):
    """One kind of K-Forcing student, as distill, decode, eval, report and checkpoint see it."""

    name: str = ""  # the model_type of its checkpoints and the "kind" of its eval results
    title: str = ""  # how messages and reports name it, e.g. "push-forward student"
    pathways: Tuple[str, ...] = ()  # the `kforcing distill --pathway` values that train it
    model_class: type = object  # its model: `registry.kind_of` recognises an instance by it
    smallest_k: int = 1  # the smallest k it decodes with (tokens per round, counting the exact one)
    decodes_with_teacher: bool = False  # loading needs the teacher (`load`'s teacher is then used)
    # The DistillConfig fields only this kind reads, with their unset values: a run of another kind that sets one is
    # an error naming this kind's pathways, never a silently ignored flag.
    options: Dict[str, object] = {}
    default_schedule: List[int] = []

    # -- checkpoints

    @abc.abstractmethod
    def load(self, directory: Path, config: dict, teacher=None, device="cpu"):
        """(student in eval mode, its tokenizer or None) of a checkpoint of this kind: `directory` resolved,
        `config` its config.json; `teacher` (a model or a path) when the caller names one."""

    def build(self, spec: dict):
        """An untrained student from its config.json alone (`kforcing.workflows.loading.build_model`); a kind whose
        students need their teacher raises ValueError."""
        raise ValueError(f"a {self.title} is built on its teacher, not from its config alone: load its checkpoint")

    # -- distillation

    @abc.abstractmethod
    def configure(self, config) -> None:
        """Fill this kind's defaults into `config` and check its settings (DistillError), before any file is read."""

    @abc.abstractmethod
    def check_run(self, config, teacher, teacher_id: str, info) -> None:
        """DistillError when `teacher` (loaded) cannot teach this kind with `config` on this process group."""

    def prepare(self, config, teacher, saved: Optional[dict]):
        """The settings a run continues with once its teacher is known: a copy when any changed (e.g. a default
        that depends on the teacher's vocabulary, or one a resumed run keeps: `saved` is the distill.json it was
        started with, None for a new run); `config` by default."""
        return config

    @abc.abstractmethod
    def distill(self, run) -> dict:
        """Train every stage of `run` (a `kforcing.training.schedule.DistillRun`); returns
        `kforcing.training.schedule.run_stages`'s summary."""

    # -- decoding

    @abc.abstractmethod
    def generate(self, student, prompts, max_new_tokens: int, *, k: Optional[int] = None, seed: int = 0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, order: str = "vocab",
                 verify: bool = False, freq_penalty: float = 0.0, eos_id: Optional[int] = None, pad_id: int = 0,
                 sequence_ids=None):
        """Decode with the student (ValueError for a setting this kind does not have); returns a generation output
        with tokens, lengths and num_passes."""

    @abc.abstractmethod
    def store_weights(self, student, dtype, draft_dtype) -> None:
        """Store the student's linear weights for decoding: `dtype` (float32 or bfloat16) for the whole model,
        `draft_dtype` for what only proposes tokens (a kind without such a part ignores it)."""

    # -- evaluation

    @abc.abstractmethod
    def check_eval(self, config, models) -> None:
        """EvalError when `config`'s flags or the loaded models do not fit an evaluation of this kind."""

    @abc.abstractmethod
    def trained_sampling(self, provenance) -> dict:
        """{"temperature", "top_k", "top_p", "order"}: the sampling the student was distilled for (its checkpoint's
        `Provenance`), what eval and sample use for the flags left unset."""

    @abc.abstractmethod
    def evaluate(self, config, models, dataset, prompts, results: dict) -> dict:
        """Every measurement of this kind into `results` (which holds the common part: ks, context_len, settings,
        machine, training budget); returns it."""

    # -- reports

    @abc.abstractmethod
    def eval_tables(self, results: dict) -> str:
        """The Markdown tables of this kind's eval results."""

    @abc.abstractmethod
    def plot_eval(self, results: dict, out: Path) -> Dict[str, Path]:
        """The PNG plots of this kind's eval results in `out`: {name: path}."""


__all__ = ["StudentKind"]
