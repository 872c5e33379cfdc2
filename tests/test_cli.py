"""The `kforcing` command line: train-teacher and sample, as a user runs them, and their error messages."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kforcing.checkpoints.checkpoint import CheckpointError, save_checkpoint
from kforcing.workflows.loading import load_model
from kforcing.cli.commands import main
from kforcing.students.push_forward.model import PushForwardLM

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train-teacher", "--config", "tiny", "--corpus-max-mb", "0.3", "--vocab-size", "512",
         "--seq-len", "32", "--batch-size", "4", "--steps", "6", "--warmup", "2", "--eval-interval", "3",
         "--eval-batches", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "teacher"
    assert main([*TRAIN, "--corpus", "stdlib", "--out", str(out)]) == 0
    return out


def run_cli(*args, expect=0):
    """The installed entry point as a user calls it (python -m kforcing.cli is the same main)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "kforcing.cli", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == expect, result.stderr[-2000:]
    return result


def test_help():
    out = run_cli("--help").stdout
    assert "train-teacher" in out and "sample" in out
    train_help = run_cli("train-teacher", "--help").stdout
    for flag in ("--corpus", "--resume", "--stop-after", "--tokenizer", "--seq-len", "--tensorboard"):
        assert flag in train_help
    assert "--k" in run_cli("sample", "--help").stdout
    # Each default is said once, and an option without one says nothing about it.
    for command in ("train-teacher", "distill", "eval", "sample", "demo"):
        text = " ".join(run_cli(command, "--help").stdout.split())
        assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text), command
    assert "(default: stdlib)" in " ".join(train_help.split())
    assert "(default: False)" not in " ".join(train_help.split())  # a switch's default is always "off"


# Benchmarks of servers that run in another environment, on whatever device it has (no --device here).
SERVER_BENCHMARKS = {"bench_vllm_serving.py"}


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")
                                          if p.name not in ("common.py", "test_microbench.py")))
def test_benchmark_help(script):
    """The benchmarks explain themselves the same way: each default said once, none for a switch or a None."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    if script not in SERVER_BENCHMARKS:
        assert "--device" in text and "(default: auto)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text)


def test_train_then_sample(teacher_run, capsys):
    assert (teacher_run / "latest.json").is_file()
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(teacher_run), "--prompt", "def main(", "--prompt", "import",
                 "--num-samples", "2", "--max-new-tokens", "12", "--no-stop", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    blocks = captured.out.split("=== sample ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["0.0", "0.1", "1.0", "1.1"]
    assert blocks[0].splitlines()[1].startswith("def main(") and blocks[2].splitlines()[1].startswith("import")
    assert blocks[0] != blocks[1]  # two samples of one prompt use different noise
    assert "AR: 48 tokens in 13 passes" in captured.err  # ragged prompts: a prefill pass + 12
    # Same seed, same samples.
    main(["sample", "--ckpt", str(teacher_run), "--prompt", "def main(", "--prompt", "import", "--num-samples", "2",
          "--max-new-tokens", "12", "--no-stop", "--seed", "3"])
    assert capsys.readouterr().out == captured.out


def test_sample_with_bf16_weights(teacher_run, capsys):
    """--dtype bfloat16 decodes with bf16 linear weights (the same prompts and seeds give samples); other dtypes are
    refused by the parser."""
    args = ["sample", "--ckpt", str(teacher_run), "--prompt", "def ", "--num-samples", "4", "--max-new-tokens", "24",
            "--no-stop", "--seed", "5"]
    capsys.readouterr()
    assert main(args + ["--dtype", "bfloat16"]) == 0
    bf16 = capsys.readouterr().out
    assert bf16.count("=== sample") == 4 and len(bf16) > 40
    with pytest.raises(SystemExit):
        main(args + ["--dtype", "float16"])


def test_sample_from_a_student(teacher_run, tmp_path, capsys):
    teacher, tokenizer, _ = load_model(teacher_run)
    student = PushForwardLM.from_teacher(teacher, 4)
    save_checkpoint(tmp_path / "student", student, tokenizer)
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(tmp_path / "student"), "--prompt", "x = ", "--max-new-tokens", "10",
                 "--k", "3", "--no-stop"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("=== sample 0.0\nx = ")
    assert "K-Forcing k=3: 10 tokens in 4 passes" in captured.err
    with pytest.raises(SystemExit) as error:
        main(["sample", "--ckpt", str(tmp_path / "student"), "--k", "5"])
    assert error.value.code == 2
    assert "k=5 is not allowed: this student decodes 1 <= k <= max_k=4" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--corpus", "/nonexistent/corpus.txt"], "corpus '/nonexistent/corpus.txt': no such file or directory"),
    (["--corpus", "EMPTY"], "is empty: it holds no text"),
    (["--corpus", "/dev/null"], "corpus '/dev/null' is empty: it holds no text"),
    (["--corpus", "stdlib", "--tokenizer", "/nonexistent/tokenizer.json"], "no such file or directory"),
])
def test_train_errors(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    with pytest.raises(SystemExit) as error:
        main([*TRAIN, *args, "--out", str(tmp_path / "run")])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kforcing: error: ") and message in err


def test_sample_errors(teacher_run, tmp_path, capsys):
    def fails(args, message):
        with pytest.raises(SystemExit) as error:
            main(["sample", *args])
        assert error.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err

    fails(["--ckpt", str(teacher_run), "--k", "4"], "--k needs a K-Forcing student checkpoint")
    fails(["--ckpt", str(tmp_path / "missing")], "does not exist")
    fails(["--ckpt", str(teacher_run), "--prompt", "def f(): pass\n" * 200],
          "longer than the model's max_seq_len=256")
    fails(["--ckpt", str(teacher_run), "--max-new-tokens", "300"], "exceeds the model's max_seq_len=256")
    fails(["--ckpt", str(teacher_run), "--freq-penalty", "1.0"], "--freq-penalty applies to push-forward")
    fails(["--ckpt", str(teacher_run), "--verify"], "--verify needs a draft student")
    fails(["--ckpt", str(teacher_run), "--teacher", str(teacher_run)], "--teacher applies to draft students only")


def test_resume_with_another_config_is_a_clear_error(teacher_run, capsys):
    with pytest.raises(SystemExit) as error:
        main([*TRAIN, "--corpus", "stdlib", "--config", "small", "--resume", "--out", str(teacher_run)])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "another model config (n_layer: 2 vs 6" in err and "--config small" in err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("kforcing")
    if not script.exists():
        pytest.skip("the kforcing console script is not installed next to this interpreter")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "train-teacher" in result.stdout


def test_out_naming_a_file_is_a_one_line_error(tmp_path, teacher_run, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    for args in ([*TRAIN, "--corpus", "stdlib", "--out", str(existing)],
                 ["distill", "--teacher", str(teacher_run), "--out", str(existing)],
                 ["eval", "--teacher", str(teacher_run), "--student", str(teacher_run), "--out", str(existing)],
                 ["demo", "--quick", "--out", str(existing)]):
        with pytest.raises(SystemExit) as error:
            main(args)
        assert error.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("kforcing: error: ") and "is an existing file" in err and err.count("\n") == 1, err
    assert existing.read_text() == "keep me"


def test_an_unwritable_out_is_a_one_line_error(tmp_path, teacher_run, capsys):
    """An --out that cannot be created (here under a regular file: permissions do not stop root) ends every writing
    command in one line naming the path, exit code 1."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    out = blocker / "run"
    for args in ([*TRAIN, "--corpus", "stdlib", "--out", str(out)],
                 ["distill", "--teacher", str(teacher_run), "--out", str(out)],
                 ["eval", "--teacher", str(teacher_run), "--student", str(teacher_run), "--out", str(out)]):
        with pytest.raises(SystemExit) as error:
            main(args)
        assert error.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("kforcing: error: ") and str(blocker) in err and err.count("\n") == 1, err
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path, teacher_run, capsys):
    for args in ([*TRAIN, "--corpus", "stdlib", "--out", str(tmp_path / "t"), "--device", "cuda"],
                 ["sample", "--ckpt", str(teacher_run), "--device", "cuda"],
                 ["distill", "--teacher", str(teacher_run), "--out", str(tmp_path / "d"), "--device", "cuda"],
                 ["eval", "--teacher", str(teacher_run), "--student", str(teacher_run), "--device", "cuda"],
                 ["demo", "--quick", "--out", str(tmp_path / "demo"), "--device", "cuda"]):
        with pytest.raises(SystemExit) as error:
            main(args)
        assert error.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("kforcing: error: ") and "no CUDA GPU is visible" in err and err.count("\n") == 1


def test_a_corrupt_checkpoint_is_a_one_line_error(tmp_path, teacher_run, capsys):
    import shutil

    from kforcing.checkpoints.checkpoint import resolve_checkpoint

    broken = tmp_path / "broken"
    shutil.copytree(resolve_checkpoint(teacher_run), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit) as error:
        main(["sample", "--ckpt", str(broken)])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kforcing: error: ") and f"{weights} is corrupt" in err and err.count("\n") == 1


def test_no_option_is_taken_by_its_prefix_and_boundary_beta_is_on_the_command_line(tmp_path, capsys):
    """`distill --k 2` once became --keep-checkpoints 2 silently: every command refuses an abbreviation now. The
    documented --boundary-beta reaches DistillConfig (and its checks) from the command line."""
    from kforcing.cli.commands import build_parser

    base = ["distill", "--teacher", "t", "--out", str(tmp_path / "run")]
    for args in (["--k", "2"], ["--keep", "2"], ["--head-l", "1"]):
        with pytest.raises(SystemExit) as error:
            main([*base, *args])
        assert error.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    for command in (["sample", "--ckpt", "c", "--max-new", "4"],
                    ["eval", "--teacher", "t", "--student", "s", "--num-s", "4"]):
        with pytest.raises(SystemExit):
            main(command)
        assert "unrecognized arguments" in capsys.readouterr().err
    args = build_parser().parse_args([*base, "--pathway", "trunk", "--readout", "onehot", "--windows", "teacher",
                                      "--boundary-beta", "0.5"])
    assert args.boundary_beta == 0.5


def test_one_run_writes_into_a_directory_at_a_time(tmp_path, capsys):
    """A second distill, train-teacher or eval on a folder another run is writing into is refused with one line naming
    the holder, before it touches anything; the lock goes with the process that held it."""
    import subprocess
    import sys
    import textwrap

    from kforcing.runtime import LOCK_FILE, RunLockedError, run_lock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from kforcing.runtime import run_lock
        with run_lock({str(out)!r}, "distill"):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for command in (["distill", "--teacher", "t", "--out", str(out)],
                        ["train-teacher", "--corpus", "stdlib", "--out", str(out)],
                        ["eval", "--teacher", "t", "--student", "s", "--out", str(out)]):
            with pytest.raises(SystemExit) as error:
                main(command)
            err = capsys.readouterr().err
            assert error.value.code == 2 and f"is in use by kforcing distill (pid {holder.pid})" in err, err
        assert sorted(path.name for path in out.iterdir()) == [LOCK_FILE]  # the refused runs wrote nothing
    finally:
        holder.kill()
        holder.wait()
    with run_lock(out, "eval"):  # the holder is gone: the folder is free again
        with pytest.raises(RunLockedError, match="in use by kforcing eval"):
            with run_lock(out, "distill"):
                pass


def test_a_teacher_run_is_never_a_students_out_nor_the_reverse(tmp_path, capsys):
    """A run folder records its kind (run.json); distill refuses a teacher's folder as --out (it would repoint its
    latest.json to the student) and train-teacher refuses a student's, before either writes anything. Folders
    written before run.json existed are recognised by their files."""
    from kforcing.checkpoints.checkpoint import RunLayout

    teacher, student, fresh = tmp_path / "teacher", tmp_path / "student", tmp_path / "fresh"
    (teacher / "checkpoints").mkdir(parents=True)  # a teacher run from before run.json
    student.mkdir()
    (student / "distill.json").write_text("{}")  # a student run from before run.json
    cases = ((["distill", "--teacher", str(teacher), "--out", str(teacher)], teacher, "holds a teacher run"),
             (["train-teacher", "--corpus", "stdlib", "--out", str(student)], student, "holds a student run"))
    for command, folder, message in cases:
        before = sorted(path.name for path in folder.iterdir())
        with pytest.raises(SystemExit) as error:
            main(command)
        err = capsys.readouterr().err
        assert error.value.code == 2 and message in err and "choose another --out" in err, err
        assert len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in folder.iterdir() if p.name != ".kforcing.lock") == before
    layout = RunLayout(fresh)
    fresh.mkdir()
    assert layout.kind() is None
    layout.claim("teacher", "train-teacher")
    assert layout.kind() == "teacher" and json.loads(layout.run_kind.read_text()) == {"kind": "teacher"}
    layout.claim("teacher", "train-teacher")  # the same kind again: fine
    with pytest.raises(CheckpointError, match="holds a teacher run"):
        layout.claim("distill", "distill")



def test_a_damaged_run_file_is_an_error_naming_it(tmp_path, capsys):
    """A run's own JSON (here distill.json of a student run) that does not parse: one line naming the file."""
    run = tmp_path / "student"
    run.mkdir()
    (run / "distill.json").write_text('{"teacher_checkpoint": ')
    with pytest.raises(SystemExit) as error:
        main(["distill", "--teacher", "t", "--out", str(run), "--resume", "--pathway", "trunk"])
    err = capsys.readouterr().err
    assert error.value.code == 2 and f"{run / 'distill.json'} is not valid JSON" in err, err
    assert len(err.strip().splitlines()) == 1
