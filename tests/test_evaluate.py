"""kforcing.evaluate: metrics on hand-built cases, coupled agreement, perplexity, the report, `kforcing eval`."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kforcing.checkpoint as ckpt
from kforcing.cli import main
from kforcing.data import TokenDataset, iter_documents, prepare_dataset, train_tokenizer
from kforcing.evaluate import (EvalConfig, EvalError, agreement_from_tokens, check_compatible, check_targets,
                               coupled_agreement, decode_speed, default_ks, distinct_n, generate_samples,
                               heldout_contexts, longest_repeated_ngram, markdown_tables, perplexity, run_eval,
                               text_statistics, unigram_entropy, window_tokens)
from kforcing.generate import generate_ar, generate_kforcing
from kforcing.model import ARModel, ModelConfig, PushForwardLM

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig.from_preset("tiny", vocab_size=300, max_seq_len=64)


# ---------------------------------------------------------------------------------------------------------
# Text statistics on hand-built token streams


def test_unigram_entropy_known_values():
    assert unigram_entropy([5] * 8) == 0.0
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))
    assert unigram_entropy([1, 1, 1, 2]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert unigram_entropy([]) == 0.0


def test_distinct_n_known_values():
    assert distinct_n([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) (2,1)
    assert distinct_n([1, 2, 1, 2, 1], 3) == pytest.approx(2 / 3)  # (1,2,1) (2,1,2) (1,2,1)
    assert distinct_n(list(range(10)), 2) == 1.0
    assert distinct_n([4] * 6, 3) == pytest.approx(1 / 4)
    assert distinct_n([1], 2) == 1.0


def test_longest_repeated_ngram_known_values():
    assert longest_repeated_ngram([1, 2, 3, 4]) == 0
    assert longest_repeated_ngram([1, 2, 3, 1, 2, 3]) == 3
    assert longest_repeated_ngram([7, 7, 7, 7]) == 3  # overlapping occurrences count: (7,7,7) at 0 and 1
    assert longest_repeated_ngram([1, 2, 9, 1, 2, 8, 5, 1, 2, 9]) == 3
    assert longest_repeated_ngram([5, 1, 5]) == 1
    assert longest_repeated_ngram([]) == 0
    stats = text_statistics([[1, 2, 3, 1, 2, 3], [4, 4, 4, 4]])
    assert stats["unigram_entropy"] == pytest.approx(math.log(3) / 2)
    assert stats["distinct_2"] == pytest.approx((3 / 5 + 1 / 3) / 2)
    assert stats["longest_repeat_mean"] == 3 and stats["longest_repeat_max"] == 3
    with pytest.raises(EvalError, match="at least one sample"):
        text_statistics([])


def test_agreement_from_tokens():
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    result = agreement_from_tokens(a, a.clone())
    assert result["per_offset"] == [1.0, 1.0, 1.0] and result["exact_match"] == 1.0 and result["windows"] == 4
    b = a.clone()
    b[0, 2] = 0  # one window wrong at offset 3
    b[1, 0] = 0  # one wrong at offset 1
    result = agreement_from_tokens(a, b)
    assert result["per_offset"] == [0.75, 1.0, 0.75] and result["exact_match"] == 0.5
    with pytest.raises(EvalError, match="one shape"):
        agreement_from_tokens(a, b[:, :2])


# ---------------------------------------------------------------------------------------------------------
# Models


def models(seed=0, max_k=4):
    torch.manual_seed(seed)
    teacher = ARModel(CONFIG).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)
    # An untrained student whose tokens depend on context and noise (weights at 2 / sqrt(fan_in)).
    student = PushForwardLM(CONFIG, max_k).eval()
    with torch.no_grad():
        for p in student.parameters():
            if p.dim() >= 2:
                p.normal_(std=2.0 / p.shape[1] ** 0.5)
        student.tok_emb.weight.normal_(std=1.0)
    return teacher, student


def contexts_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    return [torch.randint(0, CONFIG.vocab_size, (m,), generator=g).tolist() for m in lengths]


def test_identical_teacher_and_student_agree_completely():
    _, student = models()
    contexts = contexts_of(20)
    for k in (1, 2, 4):
        result = coupled_agreement(student, student, contexts, k, seed=3, batch_size=7)
        assert result["per_offset"] == [1.0] * k and result["exact_match"] == 1.0 and result["windows"] == 20


def test_coupled_agreement_compares_the_coupled_decoders():
    teacher, student = models()
    contexts = contexts_of(12)
    ar = window_tokens(teacher, contexts, 3, seed=5, batch_size=5)
    for i, context in enumerate(contexts):  # the uniforms of context i are u(seed, i, position)
        assert ar[i].tolist() == generate_ar(teacher, [context], 3, seed=5, sequence_ids=[i]).tokens[0].tolist()
    kf = window_tokens(student, contexts, 3, seed=5, batch_size=4)
    for i, context in enumerate(contexts):
        assert kf[i].tolist() == generate_kforcing(student, [context], 3, k=3, seed=5,
                                                   sequence_ids=[i]).tokens[0].tolist()
    result = coupled_agreement(teacher, student, contexts, 3, seed=5)
    assert result == agreement_from_tokens(ar, kf)
    assert result["exact_match"] < 1.0  # an untrained student does not match its teacher
    # A student as teacher decodes min(k, its max_k) per pass: a k=1 student's k=2 windows are two of its steps.
    one = PushForwardLM.from_teacher(student, 1).eval()
    two_steps = window_tokens(one, contexts, 2, seed=5, model_k=1)
    assert coupled_agreement(one, student, contexts, 2, seed=5) == agreement_from_tokens(
        two_steps, window_tokens(student, contexts, 2, seed=5))
    with pytest.raises(EvalError, match="k=5 is not allowed"):
        coupled_agreement(teacher, student, contexts, 5)


def test_perplexity_on_hand_built_models():
    teacher, _ = models()
    uniform = ARModel(CONFIG).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # every next-token distribution is uniform: perplexity = vocab size
    prompts, samples = [[1], [2, 3]], [[4, 5, 6], [7, 8, 9, 10]]
    assert perplexity(uniform, prompts, samples, batch_size=1) == pytest.approx(CONFIG.vocab_size, rel=1e-5)
    # Against a direct computation: mean NLL over the 7 sample tokens.
    total = 0.0
    for prompt, sample in zip(prompts, samples):
        ids = torch.tensor([prompt + sample])
        logp = torch.log_softmax(teacher(ids[:, :-1])[0].double(), -1)
        total += -sum(logp[len(prompt) - 1 + j, s].item() for j, s in enumerate(sample))
    assert perplexity(teacher, prompts, samples) == pytest.approx(math.exp(total / 7), rel=1e-5)
    with pytest.raises(EvalError, match="2 prompts for 1 samples"):
        perplexity(teacher, prompts, samples[:1])


def test_generate_samples_is_batch_independent():
    teacher, student = models()
    prompts = [[0]] * 5
    for model, kw in ((teacher, {}), (student, {"k": 2}), (student, {"k": 4, "freq_penalty": 1.0})):
        together = generate_samples(model, prompts, 9, seed=2, batch_size=5, **kw)
        apart = generate_samples(model, prompts, 9, seed=2, batch_size=2, **kw)
        assert together == apart and len(together) == 5 and all(len(s) == 9 for s in together)
        assert len({tuple(s) for s in together}) > 1  # one prompt, different noise per sample


def test_incompatible_models_are_refused():
    teacher, student = models()
    other = ARModel(ModelConfig.from_preset("tiny", vocab_size=301, max_seq_len=64))
    with pytest.raises(EvalError, match=r"vocabularies differ \(301 vs 300 tokens\)"):
        check_compatible(other, student)
    with pytest.raises(EvalError, match="vocabularies differ"):
        coupled_agreement(other, student, contexts_of(2), 1)
    texts = ["def f(x):\n    return x\n" * 20, "import os\nprint(os.getcwd())\n" * 20]
    a, b = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts[::-1] + ["zzz qqq"] * 5, vocab_size=300)
    if a.fingerprint() != b.fingerprint():
        with pytest.raises(EvalError, match="tokenizers differ"):
            check_compatible(teacher, student, a, b)
    check_compatible(teacher, student, a, a)


def test_decode_speed_rows():
    teacher, student = models()
    rows = decode_speed(teacher, student, [1, 2, 4], [1, 2], contexts_of(2, seed=1)[:1] * 2, 8, repeats=1)
    assert [(r["batch"], r["decoder"]) for r in rows] == [(b, d) for b in (1, 2) for d in ("AR", "k=1", "k=2", "k=4")]
    by = {(r["batch"], r["decoder"]): r for r in rows}
    assert by[(1, "AR")]["passes"] == 8 and by[(1, "k=4")]["passes"] == 2 and by[(1, "k=2")]["passes"] == 4
    assert by[(1, "AR")]["speedup"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["ms_per_pass"] > 0 for r in rows)
    assert default_ks(4) == [1, 2, 4] and default_ks(3) == [1, 2, 3] and default_ks(1) == [1]


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


def test_run_eval_writes_json_markdown_and_plots(checkpoints):
    results = run_eval(small_eval(checkpoints))
    out = checkpoints / "out"
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
    assert markdown_tables(results).count("| student |") == 6
    # The same settings give the same numbers (timings aside): everything is a function of the seed.
    again = run_eval(small_eval(checkpoints, out_dir=None, batch_sizes=[]))
    assert again["agreement"] == results["agreement"]
    assert [q["ppl_teacher"] for q in again["quality"]] == [q["ppl_teacher"] for q in results["quality"]]


def test_run_eval_with_a_reference_model_and_prompts(checkpoints):
    reference = ARModel(CONFIG)
    _, tokenizer, _ = ckpt.load_model(checkpoints / "student")
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
        assert row["ppl_reference"] == pytest.approx(280, rel=1e-5)
        assert row["ppl_teacher"] != pytest.approx(280, rel=1e-2)


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


def test_heldout_contexts_are_deterministic(checkpoints):
    dataset = TokenDataset(checkpoints / "teacher" / "data")
    a = heldout_contexts(dataset, 10, max_len=20, seed=1)
    assert a == heldout_contexts(dataset, 10, max_len=20, seed=1) != heldout_contexts(dataset, 10, 20, seed=2)
    assert all(4 <= len(c) <= 20 for c in a) and len({len(c) for c in a}) > 3
    assert heldout_contexts(dataset, 12, max_len=20, seed=1)[:10] == a  # context i depends on i only
    with pytest.raises(EvalError, match="too few for contexts"):
        heldout_contexts(dataset, 1, max_len=len(dataset.val) + 5)


def test_eval_help_lists_its_options():
    result = subprocess.run([sys.executable, "-m", "kforcing.cli", "eval", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--teacher", "--student", "--k", "--reference", "--freq-penalty", "--batch-sizes", "--out"):
        assert flag in result.stdout
