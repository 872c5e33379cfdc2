"""kforcing.workflows.evaluate and kforcing.workflows.report: results from checkpoints, their tables and plots,
`kforcing eval`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kforcing.checkpoints.checkpoint as ckpt
from kforcing.workflows.loading import load_model
from kforcing.cli.commands import main
from kforcing.data import TokenDataset, iter_documents, prepare_dataset, train_tokenizer
from kforcing.data import heldout_contexts
from kforcing.students.push_forward.evaluate import check_targets
from kforcing.workflows.evaluate import EvalConfig, run_eval, save_results
from kforcing.models.transformer import ARModel, ModelConfig
from kforcing.students.push_forward.model import PushForwardLM
from kforcing.workflows.report import eval_tables, write_eval_report
from tolerances import DIFFERENT_PERPLEXITY_REL, PERPLEXITY_REL
from tiny_models import CONFIG, models

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Quality targets


def test_targets_need_both_sample_conditions():
    results = {"ks": [1, 4], "agreement": [{"k": 4, "per_offset": [0.95, 0.9, 0.8, 0.76], "exact_match": 0.6}],
               "quality": [{"k": 0, "freq_penalty": 0.0, "ppl_teacher": 10.0, "unigram_entropy": 4.0},
                           {"k": 4, "freq_penalty": 0.0, "ppl_teacher": 9.0, "unigram_entropy": 2.0}]}
    targets = check_targets(results)
    assert targets["agree_offset_1"]["reached"] and targets["agree_offset_4"]["reached"]
    assert targets["ppl_ratio"]["reached"] and not targets["entropy_rel"]["reached"]
    assert not targets["sample_quality"]["reached"]  # low perplexity from collapsed, low-entropy text
    results["quality"][1].update(ppl_teacher=12.5, unigram_entropy=3.9)
    assert check_targets(results)["sample_quality"]["reached"]
    results["quality"][1].update(ppl_teacher=13.5)
    assert not check_targets(results)["sample_quality"]["reached"]


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation from checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A teacher and a student checkpoint (untrained weights are fine here) next to a token cache."""
    root = tmp_path_factory.mktemp("eval")
    texts = [text for _, text in iter_documents("stdlib", max_bytes=200_000)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    prepare_dataset("stdlib", tokenizer, root / "teacher" / "data", val_fraction=0.2, max_bytes=200_000)
    teacher, student = models()
    ckpt.save_checkpoint(root / "teacher" / "checkpoints" / "step_0000001", teacher, tokenizer)
    ckpt.write_latest(root / "teacher", root / "teacher" / "checkpoints" / "step_0000001", 1)
    ckpt.save_checkpoint(root / "student", student, tokenizer)
    return root


def small_eval(checkpoints, **overrides):
    settings = dict(teacher=str(checkpoints / "teacher"), student=str(checkpoints / "student"),
                    out_dir=str(checkpoints / "out"), ks=[1, 2, 4], contexts=16, num_samples=4, sample_len=12,
                    batch_sizes=[1, 2], speed_tokens=8, speed_repeats=1, batch_size=4, progress=False)
    settings.update(overrides)
    return EvalConfig(**settings)


def test_run_eval_results_and_their_report(checkpoints):
    results = run_eval(small_eval(checkpoints))
    out = checkpoints / "out"
    save_results(results, out)
    write_eval_report(results, out)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["ks"] == [1, 2, 4] and [a["k"] for a in saved["agreement"]] == [1, 2, 4]
    assert [(q["model"], q["k"], q["freq_penalty"]) for q in saved["quality"]] == [
        ("AR teacher", 0, 0.0), ("student", 1, 0.0), ("student", 2, 0.0), ("student", 4, 0.0),
        ("student", 1, 1.0), ("student", 2, 1.0), ("student", 4, 1.0)]
    for q in saved["quality"]:
        assert {"ppl_teacher", "unigram_entropy", "distinct_2", "distinct_3", "longest_repeat_mean"} <= set(q)
    assert len(saved["speed"]) == 2 * 4 and saved["machine"]["device"] == "cpu"
    assert set(saved["targets"]) >= {"agree_offset_1", "agree_offset_4", "sample_quality"}
    markdown = (out / "eval.md").read_text()
    for heading in ("Coupled agreement", "Sample quality", "Decode speed", "Quality targets"):
        assert heading in markdown
    for png in ("quality_vs_k.png", "agreement.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert eval_tables(results).count("| student |") == 6
    # The same settings give the same numbers (timings aside): everything is a function of the seed.
    again = run_eval(small_eval(checkpoints, out_dir=None, batch_sizes=[]))
    assert again["agreement"] == results["agreement"]
    assert [q["ppl_teacher"] for q in again["quality"]] == [q["ppl_teacher"] for q in results["quality"]]


def test_run_eval_with_a_reference_model_and_prompts(checkpoints):
    reference = ARModel(CONFIG)
    _, tokenizer, _ = load_model(checkpoints / "student")
    ckpt.save_checkpoint(checkpoints / "reference", reference, tokenizer)
    results = run_eval(small_eval(checkpoints, out_dir=None, ks=[2], reference=str(checkpoints / "reference"),
                                  prompt_len=5, freq_penalty=0.0, batch_sizes=[]))
    assert len(results["quality"]) == 2 and all("ppl_reference" in q for q in results["quality"])
    assert results["speed"] == [] and results["targets"]["k"] == 2 and "agree_offset_4" not in results["targets"]


def test_reference_with_another_tokenizer_scores_the_decoded_text(checkpoints):
    """A reference LM with its own tokenizer scores the samples' text, re-tokenised: a reference with uniform
    next-token distributions has perplexity exactly its vocabulary size, whatever the tokens."""
    texts = [text for _, text in iter_documents("stdlib", max_bytes=100_000)]
    tokenizer = train_tokenizer(texts, vocab_size=280)
    reference = ARModel(ModelConfig.from_preset("tiny", vocab_size=280, max_seq_len=64))
    with torch.no_grad():
        reference.lm_head.weight.zero_()
    ckpt.save_checkpoint(checkpoints / "reference280", reference, tokenizer)
    results = run_eval(small_eval(checkpoints, out_dir=None, ks=[1], reference=str(checkpoints / "reference280"),
                                  freq_penalty=0.0, batch_sizes=[]))
    for row in results["quality"]:
        assert row["ppl_reference"] == pytest.approx(280, rel=PERPLEXITY_REL)
        assert row["ppl_teacher"] != pytest.approx(280, rel=DIFFERENT_PERPLEXITY_REL)


def test_eval_cli_and_its_errors(checkpoints, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["eval", "--teacher", str(checkpoints / "teacher"), "--student", str(checkpoints / "student"),
                 "--k", "1,2", "--contexts", "8", "--num-samples", "2", "--sample-len", "6", "--batch-sizes", "1",
                 "--speed-tokens", "4", "--speed-repeats", "1", "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "### Coupled agreement" in captured.out and (out / "eval.json").is_file()

    def fails(args, message):
        with pytest.raises(SystemExit) as error:
            main(["eval", *args, "--no-progress", "--batch-sizes", ""])
        assert error.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("kforcing: error: ") and message in err, err

    teacher, student = str(checkpoints / "teacher"), str(checkpoints / "student")
    fails(["--teacher", teacher, "--student", str(tmp_path / "missing")], "does not exist")
    fails(["--teacher", student, "--student", student], "it must be the AR teacher")
    fails(["--teacher", teacher, "--student", teacher], "it must be a K-Forcing student")
    fails(["--teacher", teacher, "--student", student, "--k", "8"], "--k 8 is not allowed")
    other = PushForwardLM(ModelConfig.from_preset("tiny", vocab_size=320, max_seq_len=64), 2)
    ckpt.save_checkpoint(tmp_path / "other", other)
    fails(["--teacher", teacher, "--student", str(tmp_path / "other")], "vocabularies differ (300 vs 320 tokens)")
    fails(["--teacher", teacher, "--student", student, "--sample-len", "100"], "exceeds the models' max_seq_len=64")
    fails(["--teacher", teacher, "--student", student, "--sample-len", "6", "--data-dir", str(tmp_path)],
          "holds no token cache")
    fails(["--teacher", teacher, "--student", student, "--sample-len", "6", "--context-len", "1000"],
          "--context-len 1000 does not fit: the models' max_seq_len=64 holds at most")


def test_heldout_contexts_are_deterministic(checkpoints):
    dataset = TokenDataset(checkpoints / "teacher" / "data")
    a = heldout_contexts(dataset, 10, max_len=20, seed=1)
    assert a == heldout_contexts(dataset, 10, max_len=20, seed=1) != heldout_contexts(dataset, 10, 20, seed=2)
    assert all(4 <= len(c) <= 20 for c in a) and len({len(c) for c in a}) > 3
    assert heldout_contexts(dataset, 12, max_len=20, seed=1)[:10] == a  # context i depends on i only
    with pytest.raises(ValueError, match="too few for contexts"):
        heldout_contexts(dataset, 1, max_len=len(dataset.val) + 5)


def test_eval_help_lists_its_options():
    result = subprocess.run([sys.executable, "-m", "kforcing.cli", "eval", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--teacher", "--student", "--k", "--reference", "--freq-penalty", "--batch-sizes", "--out"):
        assert flag in result.stdout
