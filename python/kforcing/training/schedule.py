"""What every student's distillation shares: the run it is handed (`DistillRun`), the check of its schedule, and
the loop over its stages (`run_stages`).

A distillation trains one stage per k of its schedule, in order. A finished stage (its done.json and final/
checkpoint) is kept on --resume; an interrupted one continues from its newest training checkpoint; `stop_after`
ends the run mid-stage. After each finished stage the run's latest.json names that stage's final/ checkpoint, so
`kforcing sample --ckpt OUT` and `kforcing eval --student OUT` find the newest student.
"""

import dataclasses
from typing import Callable, Optional, Sequence

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import RunLayout
from ..data import TokenDataset
from ..runtime import read_json
from .stage_task import DistillError
from .trainer import DistInfo


@dataclasses.dataclass
class DistillRun:
    """What `kforcing.workflows.distill` hands a student kind to train: the settings (a DistillConfig), the loaded
    teacher and its id (a checkpoint directory or "hf:PATH"), the token data, the context length, the run
    directory, the process group and the device."""

    config: object
    teacher: object
    teacher_id: str
    dataset: TokenDataset
    tokenizer: object
    seq_len: int
    layout: RunLayout
    info: DistInfo
    device: object


def check_schedule(schedule: Sequence[int], objective: str = "self-forcing", start: Optional[int] = 1):
    """Raise DistillError unless `schedule` is a valid list of stage sizes k.

    Self-forcing builds stage 2k's targets from two k-token steps of the stage-k student, so the schedule must start
    at `start` (1 from an AR teacher, 2m from a student with max_k m) and double at every stage: 1,2,4,8.
    Noise-inversion targets come from data, and a draft student's head ("growth") drafts more tokens at each stage,
    so any strictly increasing schedule starting at >= start works. start=None skips the check of the first stage
    (the teacher is not known yet).
    """
    if not schedule or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in schedule):
        raise DistillError(f"schedule must be a non-empty list of positive ints such as 1,2,4, got {schedule!r}")
    if objective == "growth":  # a draft student's head: any increasing schedule from k >= start
        if schedule[0] < start:
            raise DistillError(f"schedule {list(schedule)} must start at k >= {start}: the head drafts tokens 2..k")
        for a, b in zip(schedule, schedule[1:]):
            if b <= a:
                raise DistillError(f"schedule {list(schedule)} must increase, got k={a} then k={b}")
        return
    if objective == "self-forcing":
        if start is not None and schedule[0] != start:
            what = "an AR teacher" if start == 1 else f"a teacher student with max_k={start // 2}"
            raise DistillError(f"schedule {list(schedule)} must start at k={start} for {what} (self-forcing builds "
                               f"each stage from the previous one)")
        for a, b in zip(schedule, schedule[1:]):
            if b != 2 * a:
                raise DistillError(f"schedule {list(schedule)} does not double: after k={a} comes k={b}, but "
                                   f"self-forcing stage k -> 2k needs {2 * a} (e.g. 1,2,4)")
    else:
        if start is not None and schedule[0] < start:
            raise DistillError(f"schedule {list(schedule)} must start at k >= {start}")
        for a, b in zip(schedule, schedule[1:]):
            if b <= a:
                raise DistillError(f"schedule {list(schedule)} must increase, got k={a} then k={b}")


def _finished_stage(stage_layout: RunLayout, k: int) -> dict:
    summary = read_json(stage_layout.done)
    if not (stage_layout.final / "config.json").is_file():
        raise ckpt.CheckpointError(f"{stage_layout.done} marks stage k={k} finished but {stage_layout.final} is not "
                                   f"a checkpoint; delete {stage_layout.root} to redo the stage")
    return summary


def run_stages(run: DistillRun, train: Callable, finished: Callable) -> dict:
    """Run the stages in order: a finished stage is kept, `train(index, k, steps, stage layout, steps before)`
    runs the others (None: stop_after ended the run inside it); `finished(stage layout)` hands a stage's export
    to the next one. Returns the run's summary: {"stages", "checkpoint" (the final student's directory, None
    until every stage is done), "out_dir", "seq_len"}."""
    config, layout, info = run.config, run.layout, run.info
    summaries, steps_before = [], 0
    for index, (k, steps) in enumerate(zip(config.schedule, config.stage_steps())):
        stage_layout = layout.stage(k)
        if stage_layout.done.is_file():
            summary = _finished_stage(stage_layout, k)
        elif config.stop_after is not None and steps_before >= config.stop_after:
            break
        else:
            summary = train(index, k, steps, stage_layout, steps_before)
            if summary is None:  # stopped mid-stage (stop_after)
                break
        summaries.append(summary)
        steps_before += summary["steps_budget"]
        finished(stage_layout)
        if info.main:
            ckpt.write_latest(layout.root, stage_layout.final, summary["step"])
        info.barrier()
    final = None
    if summaries and len(summaries) == len(config.schedule):
        final = str(layout.stage(config.schedule[-1]).final)
    return {"stages": summaries, "checkpoint": final, "out_dir": str(layout.root), "seq_len": run.seq_len}


__all__ = ["DistillRun", "check_schedule", "run_stages"]
