"""`kforcing demo --quick` as a user runs it: every phase, the report's sections, and resuming."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kforcing.cli.demo import PROFILES
from kforcing.workflows.report import SECTIONS

REPO = Path(__file__).resolve().parents[1]


def run_demo(out, *extra):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "kforcing.cli", "demo", "--quick", "--out", str(out), *extra],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_demo_quick_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    report = out / "report.md"
    assert f"report: {report}" in first.stdout
    assert "K-Forcing demo summary" in first.stdout and "speedup vs AR (batch 1)" in first.stdout
    # The headline comes first: the default (draft) student's speed against AR, verified and unverified, beside its
    # sample quality, then the push-forward student.
    summary_text = first.stdout
    assert summary_text.index("default student: a draft student") < summary_text.index("push-forward student")
    headline = {line[:26].strip(): line[26:].split() for line in summary_text.splitlines()
                if line.startswith(("equals AR sampling", "speed vs AR (batch", "PPL under teacher "))}
    assert headline["equals AR sampling"][:2] == ["yes", "yes"]  # adaptive and pinned k verified equal AR
    for batch in PROFILES["quick"].batch_sizes:
        cells = headline[f"speed vs AR (batch {batch})"]
        assert len(cells) == 4 and cells[-1] == "1.00x" and all(c.endswith("x") for c in cells)
    assert "train-teacher" in first.stderr and "distill k=4" in first.stderr  # progress bars
    assert "distill chain k=4" in first.stderr and "verified" in first.stdout
    text = report.read_text()
    for section in SECTIONS:
        assert section in text, section
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    first_screen = text[:text.index("## Setup")]  # the plot and one sample per model, under the summary
    assert "plots/headline.png" in first_screen
    for model in ("| teacher | AR, temperature 0.7", "| draft student (default) | unverified, k=4 |",
                  "| teacher | AR, temperature 1 |", "| push-forward student | k=4 |"):
        assert model in first_screen, model
    for name in ("headline", "teacher_loss", "distill_curves", "quality_vs_k", "agreement", "throughput",
                 "draft_acceptance", "draft_throughput"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"plots/{name}.png" in text
    summary = json.loads((out / "summary.json").read_text())
    quick = PROFILES["quick"]
    assert [s["k"] for s in summary["stages"]] == [1, 2, 4]
    assert [s["step"] for s in summary["stages"]] == quick.distill_steps
    assert summary["teacher"]["steps"] == quick.teacher_steps
    assert summary["teacher"]["val_loss"] < summary["teacher"]["first_val_loss"] - 1.0  # the teacher learned
    stage1 = summary["stages"][0]
    assert stage1["ar_agree_1"] > stage1["initial"]["ar_agree_1"] + 0.1  # distillation moved the student
    results = summary["eval"]
    assert results["ks"] == [1, 2, 4] and len(results["quality"]) == 7 and results["speed"]
    # The draft student: trained, and decoded losslessly (equal to AR sampling) and unverified, side by side.
    draft = summary["draft"]
    assert [s["step"] for s in draft["stages"]] == [quick.draft_steps]
    assert draft["eval"]["kind"] == "draft" and all(v["equals_ar"] for v in draft["eval"]["verified"])
    adaptive = draft["eval"]["verified_adaptive"]
    assert adaptive["equals_ar"] and adaptive["tokens_per_pass"] >= 1
    assert {s["decoder"] for s in draft["eval"]["speed"]} >= {"AR", "verified k=4", "unverified k=4"}
    assert (out / "draft" / "eval" / "eval.md").is_file()
    # Checkpoints: the teacher run and the students, the run's latest being the k=4 student.
    latest = json.loads((out / "student" / "latest.json").read_text())
    assert latest["checkpoint"] == "stage_k4/final"
    assert (out / "teacher" / "latest.json").is_file() and (out / "eval" / "eval.json").is_file()

    # Re-running resumes: every phase is finished, only the report is written again.
    stage1_weights = out / "student" / "stage_k1" / "final" / "model.safetensors"
    mtime = stage1_weights.stat().st_mtime_ns
    second = run_demo(out, "--no-progress")
    for phase in ("teacher: finished earlier", "distillation: finished earlier", "evaluation: finished earlier",
                  "draft student: finished earlier", "draft evaluation: finished earlier"):
        assert phase in second.stderr
    assert second.stdout.split("report:")[0] == first.stdout.split("report:")[0]

    # An interrupted distillation resumes from its finished stages: redo only stage k=4 and what follows.
    state = json.loads((out / "demo_state.json").read_text())
    for phase in ("distill", "eval", "draft", "draft_eval"):
        del state["phases"][phase]
    (out / "demo_state.json").write_text(json.dumps(state))
    for path in sorted((out / "student" / "stage_k4").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    third = run_demo(out, "--no-progress")
    assert "teacher: finished earlier" in third.stderr and "2/6 distillation" in third.stderr
    assert stage1_weights.stat().st_mtime_ns == mtime  # stages k=1 and k=2 were kept
    assert json.loads((out / "summary.json").read_text())["stages"][2]["step"] == quick.distill_steps[2]
    # The students in the folder work with the other commands.
    sample = subprocess.run([sys.executable, "-m", "kforcing.cli", "sample", "--ckpt", str(out / "student"),
                             "--k", "4", "--max-new-tokens", "8", "--no-stop"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert sample.returncode == 0 and "K-Forcing k=4: 8 tokens in 2 passes" in sample.stderr


def test_demo_refuses_another_profile_in_the_same_folder(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_state.json").write_text(json.dumps({"profile": {"name": "default"}, "phases": {}}))
    result = subprocess.run([sys.executable, "-m", "kforcing.cli", "demo", "--quick", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "kforcing: error: " in result.stderr and "another profile ('default')" in result.stderr


@pytest.mark.parametrize("args", [["--quick", "--full"]])
def test_demo_profiles_are_exclusive(args):
    result = subprocess.run([sys.executable, "-m", "kforcing.cli", "demo", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
