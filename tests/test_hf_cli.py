"""A Hugging Face teacher end to end on the command line: distill --teacher hf:PATH, eval, sample."""

import json

import pytest

pytest.importorskip("transformers")

import kforcing.checkpoints.checkpoint as ckpt  # noqa: E402
from kforcing.cli.commands import main  # noqa: E402
from kforcing.students.draft.checkpoint import TEACHER_FILE  # noqa: E402
from hf_models import save_tiny, tiny_tokenizer  # noqa: E402

SAMPLING = ["--temperature", "0.7", "--top-k", "50", "--top-p", "0.9"]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, with a tokenizer built for it (vocabulary 320) in the same folder."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    save_tiny("llama", directory, vocab_size=320, tokenizer=tiny_tokenizer(320))
    return directory


@pytest.mark.parametrize("student", [[], ["--pathway", "trunk", "--adapter-rank", "2"]], ids=["chain", "trunk"])
def test_distill_eval_and_sample_a_hugging_face_teacher(hf_model, tmp_path, capsys, student):
    teacher = f"hf:{hf_model}"
    run = tmp_path / "run"
    assert main(["distill", "--teacher", teacher, "--corpus", "stdlib", "--corpus-max-mb", "0.3", "--out", str(run),
                 "--steps", "6", "--batch-size", "4", "--seq-len", "16", *student, "--warmup", "2",
                 "--eval-interval", "3", "--eval-batches", "1", "--ar-eval-contexts", "4", "--tau", "0.7",
                 "--top-k", "50", "--top-p", "0.9", "--device", "cpu", "--no-progress"]) == 0
    assert "verified tokens per pass" in capsys.readouterr().err
    final = run / "stage_k4" / "final"
    config = ckpt.read_config(final)
    assert config["teacher_kind"] == "hf" and config["provenance"]["teacher"] == f"hf:{hf_model.resolve()}"
    assert TEACHER_FILE not in {path.name for path in final.iterdir()}
    assert (final / "model.safetensors").stat().st_size < (hf_model / "model.safetensors").stat().st_size

    assert main(["eval", "--teacher", teacher, "--student", str(run), "--num-samples", "2", "--sample-len", "8",
                 "--batch-size", "2", "--batch-sizes", "", "--contexts", "4", "--device", "cpu", "--no-plots",
                 "--no-progress"]) == 0
    results = json.loads((run / "eval" / "eval.json").read_text())
    assert results["teacher"] == teacher and results["kind"] == "draft"
    assert all(row["equals_ar"] for row in results["verified"])
    capsys.readouterr()

    common = ["--max-new-tokens", "12", "--no-stop", "--prompt", "def ", *SAMPLING]
    assert main(["sample", "--ckpt", str(run), "--verify", *common]) == 0
    verified = capsys.readouterr()
    assert main(["sample", "--ckpt", teacher, *common]) == 0
    ar = capsys.readouterr()
    assert verified.out == ar.out and "AR: 12 tokens in 12 passes" in ar.err
    assert "verified K-Forcing, adaptive up to k=4" in verified.err and "12 tokens in" in verified.err


def test_command_line_errors_name_the_problem(hf_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--teacher", f"hf:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", f"hf:{hf_model}", "--paper", "--corpus", "stdlib", "--out",
              str(tmp_path / "full")])
    assert "a Hugging Face teacher stays frozen: use --pathway chain or trunk" in capsys.readouterr().err
