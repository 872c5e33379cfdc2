"""`kforcing demo`: the whole method on this machine, end to end, with a report.

    kforcing demo             # about 7 minutes on a 2-core CPU (measured 6-7; the kernels' build comes first)
    kforcing demo --quick     # about 1 minute on a 2-core CPU (a smoke run)
    kforcing demo --full      # the `small` preset trained for real: a GPU job

Phases (each one resumes: re-running keeps what is finished):
    1. corpus      the default corpus (the running Python's standard library + pydoc topics), a byte-level BPE
                   tokenizer and a memory-mapped token cache (`kforcing.data`);
    2. teacher     a tiny AR teacher (`kforcing.training.train.train_teacher`);
    3. distill     progressive self-forcing distillation 1 -> 2 -> 4 (`kforcing.workflows.distill.distill`);
    4. eval        coupled agreement, sample quality with and without frequency penalty, and the AR vs K-Forcing
                   decode benchmark (`kforcing.workflows.evaluate.run_eval`);
    5. draft       a draft student with `kforcing distill`'s defaults: the frozen teacher plus trainable hint rows,
                   learning truncated sampling (`kforcing.students.draft.distill.DRAFT_SAMPLING`);
    6. draft eval  verified (lossless) and unverified decoding side by side: tokens per pass, acceptance against
                   the u-blind floor, sample quality and speed against AR (`kforcing.workflows.evaluate.run_eval`);
    7. report      a summary table on stdout and a report folder (`kforcing.workflows.report`).

Each phase hands the next what it returned (its summary, kept in demo_state.json); the report is made from those
results and the eval results data (eval/eval.json), never from another phase's Markdown.

The report folder (default runs/demo, runs/demo-quick, runs/demo-full):

    report.md        every section: setup, corpus, teacher, distillation, agreement, sample quality, decode speed,
                     quality targets, samples, files
    summary.json     every number of the report
    plots/           teacher_loss.png, distill_curves.png, quality_vs_k.png, agreement.png, throughput.png
    eval/            eval.json, eval.md (`kforcing eval`'s output)
    teacher/         the teacher run (checkpoints, tokenizer, token cache, metrics.jsonl)
    student/         the distillation run (stage_k1, stage_k2, stage_k4, latest.json -> the k=4 student)
    draft/           the draft student's run (stage_k4, latest.json) and its evaluation (draft/eval/eval.json)
    demo_state.json  which phases are finished, with their results and wall times
"""

import dataclasses
import datetime
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import RunLayout
from ..runtime import git_sha, read_json, resolve_device, write_json_atomic, write_text_atomic
from ..students.draft.distill import DRAFT_SAMPLING
from ..students.draft.report import plot_draft
from ..training.train import TrainConfig, train_teacher
from ..workflows.distill import DistillConfig, distill
from ..workflows.evaluate import EvalConfig, load_results, run_eval, save_results
from ..workflows.report import demo_markdown, plot_eval, plot_headline, plot_training, summary_table, write_eval_report

DEFAULT_OUT = {"quick": "runs/demo-quick", "default": "runs/demo", "full": "runs/demo-full"}


@dataclasses.dataclass
class DemoProfile:
    """The sizes of a demo run (see PROFILES)."""

    name: str
    preset: str
    corpus_mb: Optional[float]
    vocab_size: int
    teacher_steps: int
    teacher_batch: int
    teacher_seq_len: int
    distill_steps: List[int]
    distill_batch: int
    distill_seq_len: int
    eval_contexts: int
    num_samples: int
    sample_len: int
    batch_sizes: List[int]
    speed_tokens: int
    speed_repeats: int
    ar_eval_contexts: int
    draft_steps: int = 600
    schedule: List[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    teacher_lr: Optional[float] = None
    distill_lr: Optional[float] = None
    warmup: int = 50
    eval_interval: int = 100
    minutes: str = ""


PROFILES = {
    "quick": DemoProfile(
        name="quick", preset="tiny", corpus_mb=1.0, vocab_size=512, teacher_steps=300, teacher_batch=16,
        teacher_seq_len=64, distill_steps=[150, 120, 120], distill_batch=16, distill_seq_len=48, eval_contexts=64,
        num_samples=8, sample_len=48, batch_sizes=[1, 8], speed_tokens=32, speed_repeats=2, ar_eval_contexts=64,
        draft_steps=200, warmup=20, eval_interval=50, minutes="about 1 minute on a 2-core CPU"),
    "default": DemoProfile(
        # The budget goes where a reader sees the method work: the teacher gets the largest share (2500 steps
        # reach readable Python, 1000 did not), then the default (draft) student; the push-forward stages get
        # what is left (measured: bench/results/demo_budget_cpu/).
        name="default", preset="tiny", corpus_mb=3.0, vocab_size=1024, teacher_steps=2500, teacher_batch=16,
        teacher_seq_len=128, distill_steps=[300, 300, 400], distill_batch=16, distill_seq_len=64,
        eval_contexts=256, num_samples=32, sample_len=128, batch_sizes=[1, 8, 32], speed_tokens=64,
        speed_repeats=3, ar_eval_contexts=128, draft_steps=2400, eval_interval=100,
        minutes="about 7 minutes on a 2-core CPU"),
    "full": DemoProfile(
        name="full", preset="small", corpus_mb=None, vocab_size=8192, teacher_steps=20000, teacher_batch=32,
        teacher_seq_len=512, distill_steps=[5000, 5000, 10000], distill_batch=32, distill_seq_len=256,
        eval_contexts=1024, num_samples=128, sample_len=256, batch_sizes=[1, 8, 32, 128, 256], speed_tokens=128,
        speed_repeats=5, ar_eval_contexts=512, draft_steps=10000, warmup=500, eval_interval=500,
        minutes="hours on one GPU (days on a CPU)"),
}


class _State:
    """demo_state.json: finished phases with their results and wall times."""

    VERSION = 2  # 2: phases keep the results the report is made from (1 kept wall times only)

    def __init__(self, path: Path, profile: DemoProfile):
        self.path = path
        self.data = {"version": self.VERSION, "profile": dataclasses.asdict(profile), "phases": {}}
        if path.is_file():
            saved = read_json(path)
            if saved.get("profile") != self.data["profile"]:
                raise ValueError(f"{path.parent} holds a demo run of another profile "
                                 f"({saved.get('profile', {}).get('name')!r}); choose another --out or delete it")
            if saved.get("version") == self.VERSION:  # else every phase runs again, resuming its finished work
                self.data = saved

    def run(self, phase: str, message: str, work: Callable[[], Dict]) -> Dict:
        """The phase's result: from an earlier run, or work()'s (timed and recorded)."""
        if phase in self.data["phases"]:
            _log(f"{message.split(' ', 1)[0]} {_PHASE_NAMES[phase]}: finished earlier")
            return self.data["phases"][phase]
        _log(message)
        start = time.perf_counter()
        result = work()
        self.data["phases"][phase] = {**result, "seconds": time.perf_counter() - start}
        write_json_atomic(self.path, self.data)
        return self.data["phases"][phase]


_PHASE_NAMES = {"teacher": "teacher", "distill": "distillation", "eval": "evaluation", "draft": "draft student",
                "draft_eval": "draft evaluation"}


def _log(message):
    """One line per phase on stderr (also with progress bars off)."""
    print(f"[kforcing demo] {message}", file=sys.stderr, flush=True)


def _teacher_config(prof: DemoProfile, out: Path, device: str, progress: bool) -> TrainConfig:
    return TrainConfig(
        out_dir=str(out), preset=prof.preset, corpus=["stdlib"],
        corpus_max_bytes=None if prof.corpus_mb is None else int(prof.corpus_mb * 1e6),
        vocab_size=prof.vocab_size, val_fraction=0.05, seq_len=prof.teacher_seq_len, batch_size=prof.teacher_batch,
        steps=prof.teacher_steps, lr=prof.teacher_lr, warmup_steps=max(10, prof.teacher_steps // 20),
        eval_interval=max(1, prof.teacher_steps // 4), eval_batches=8, save_interval=max(1, prof.teacher_steps // 2),
        log_interval=max(1, prof.teacher_steps // 20), device=device,
        resume=ckpt.find_resume_checkpoint(out) is not None, progress=progress)


def _distill_config(prof: DemoProfile, teacher: Path, out: Path, device: str, progress: bool) -> DistillConfig:
    return DistillConfig(
        teacher=str(teacher), out_dir=str(out), pathway="full", schedule=prof.schedule, steps=prof.distill_steps,
        batch_size=prof.distill_batch, seq_len=prof.distill_seq_len, lr=prof.distill_lr, warmup_steps=prof.warmup,
        eval_interval=prof.eval_interval, eval_batches=4, ar_eval_contexts=prof.ar_eval_contexts,
        save_interval=max(prof.distill_steps), log_interval=max(1, min(prof.distill_steps) // 20), device=device,
        resume=True, progress=progress)


def _draft_config(prof: DemoProfile, teacher: Path, out: Path, device: str, progress: bool) -> DistillConfig:
    return DistillConfig(
        teacher=str(teacher), out_dir=str(out), steps=[prof.draft_steps],
        batch_size=prof.distill_batch, seq_len=prof.distill_seq_len, warmup_steps=prof.warmup,
        eval_interval=max(prof.eval_interval, prof.draft_steps // 4), eval_batches=4,
        ar_eval_contexts=prof.ar_eval_contexts, save_interval=prof.draft_steps,
        log_interval=max(1, prof.draft_steps // 20), device=device, resume=True, progress=progress)


def _eval_config(prof: DemoProfile, teacher: Path, student: Path, out: Path, device: str, progress: bool,
                 **sampling) -> EvalConfig:
    return EvalConfig(
        teacher=str(teacher), student=str(student), out_dir=str(out), contexts=prof.eval_contexts,
        num_samples=prof.num_samples, sample_len=prof.sample_len, batch_sizes=prof.batch_sizes,
        speed_tokens=prof.speed_tokens, speed_repeats=prof.speed_repeats,
        batch_size=min(32, max(8, prof.num_samples)), device=device, plots=False, progress=progress, **sampling)


def _run_phases(prof: DemoProfile, out: Path, state: _State, device: str, progress: bool) -> Dict:
    """Run (or skip) teacher, distillation and evaluation; returns their results by phase."""
    teacher_dir, student_dir, eval_dir, draft_dir = out / "teacher", out / "student", out / "eval", out / "draft"

    def teacher():
        summary = train_teacher(_teacher_config(prof, teacher_dir, device, progress))
        return {key: summary[key] for key in ("step", "params", "checkpoint", "data")}

    def student():
        summary = distill(_distill_config(prof, teacher_dir, student_dir, device, progress))
        return {"stages": summary["stages"], "checkpoint": summary["checkpoint"]}

    def evaluation():
        results = run_eval(_eval_config(prof, teacher_dir, student_dir, eval_dir, device, progress))
        save_results(results, eval_dir)
        return {}

    def draft():
        summary = distill(_draft_config(prof, teacher_dir, draft_dir, device, progress))
        return {"stages": summary["stages"], "checkpoint": summary["checkpoint"]}

    def draft_evaluation():
        config = _eval_config(prof, teacher_dir, draft_dir, draft_dir / "eval", device, progress, **DRAFT_SAMPLING)
        save_results(run_eval(config), draft_dir / "eval")
        return {}

    return {
        "teacher": state.run("teacher", f"1/6 corpus + teacher ({prof.preset} preset, {prof.teacher_steps} steps) -> "
                             f"{teacher_dir}", teacher),
        "distill": state.run("distill", f"2/6 distillation k = {' -> '.join(map(str, prof.schedule))} "
                             f"({prof.distill_steps} steps) -> {student_dir}", student),
        "eval": state.run("eval", f"3/6 evaluation + decode benchmark -> {eval_dir}", evaluation),
        "draft": state.run("draft", f"4/6 draft student on the frozen teacher ({prof.draft_steps} steps) -> "
                           f"{draft_dir}", draft),
        "draft_eval": state.run("draft_eval", f"5/6 verified and unverified decoding -> {draft_dir / 'eval'}",
                                draft_evaluation),
    }


def _summary(prof: DemoProfile, out: Path, phases: Dict, results: Dict, draft_results: Dict,
             teacher_records: List[Dict], state: _State, seconds: float) -> Dict:
    """summary.json: every number of the report, from the phases' results and the eval results."""
    val = [r for r in teacher_records if "val_loss" in r]
    teacher = phases["teacher"]
    return {
        "profile": dataclasses.asdict(prof),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_sha(), "machine": results.get("machine"), "total_seconds_this_run": seconds,
        "phase_seconds": {name: phase.get("seconds") for name, phase in state.data["phases"].items()},
        "corpus": teacher["data"],
        "teacher": {"preset": prof.preset, "params": teacher["params"], "steps": teacher["step"],
                    "batch_size": prof.teacher_batch, "seq_len": prof.teacher_seq_len,
                    "tokens": teacher["step"] * prof.teacher_batch * prof.teacher_seq_len,
                    "first_val_loss": val[0]["val_loss"] if val else None,
                    "val_loss": val[-1]["val_loss"] if val else None},
        "stages": phases["distill"]["stages"], "eval": results,
        "draft": {"stages": phases["draft"]["stages"], "eval": draft_results},
        "files": {"teacher_checkpoint": os.path.relpath(teacher["checkpoint"], out)},
    }


def run_demo(profile="default", out_dir=None, device="auto", threads=None, progress=True) -> Dict:
    """Run (or resume) the demo; returns {"report": report.md path, "out_dir", "summary": the summary table text,
    "results": every number}."""
    if profile not in PROFILES:
        raise ValueError(f"unknown demo profile {profile!r}; choose one of {sorted(PROFILES)}")
    prof = PROFILES[profile]
    if threads:
        torch.set_num_threads(threads)
    device_name = str(resolve_device(device))
    if profile == "full" and not device_name.startswith("cuda"):
        print("kforcing demo --full: no GPU is in use; this profile takes days on a CPU (Ctrl-C and re-run later to "
              "resume)", file=sys.stderr)
    out = Path(out_dir or DEFAULT_OUT[profile])
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out / "demo_state.json", prof)
    started = time.perf_counter()
    phases = _run_phases(prof, out, state, device_name, progress)

    _log("6/6 report")
    results, draft_results = load_results(out / "eval"), load_results(out / "draft" / "eval")
    write_eval_report(results, out / "eval", plots=False)
    write_eval_report(draft_results, out / "draft" / "eval", plots=False)
    plots = out / "plots"
    if plots.exists():
        shutil.rmtree(plots)
    plots.mkdir()
    stage_records = {k: RunLayout(out / "student").stage(k).read_metrics() for k in prof.schedule}
    teacher_records = RunLayout(out / "teacher").read_metrics()
    plot_paths = {**plot_eval(results, plots), **plot_training(teacher_records, stage_records, plots)}
    plot_paths.update({f"draft_{name}": path for name, path in plot_draft(draft_results, plots, "draft_").items()})
    data = _summary(prof, out, phases, results, draft_results, teacher_records, state, time.perf_counter() - started)
    plot_paths.update(plot_headline(data, plots))
    write_json_atomic(out / "summary.json", data)
    report = out / "report.md"
    write_text_atomic(report, demo_markdown(data, plot_paths, out))
    return {"report": str(report), "out_dir": str(out), "summary": summary_table(data), "results": data}


__all__ = ["DemoProfile", "PROFILES", "run_demo"]
