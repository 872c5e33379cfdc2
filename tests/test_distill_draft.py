"""distill --pathway head|trunk|chain: draft checkpoints, resuming, evaluation, the CLI, bad settings, and learning."""

import json
import shutil

import pytest
import torch

from kforcing.workflows.loading import load_model
from kforcing.checkpoints.checkpoint import CheckpointError, Provenance
from kforcing.data import iter_documents, train_tokenizer
from kforcing.cli.commands import main
from kforcing.workflows.distill import DistillConfig, DistillError, distill
from kforcing.students.draft.checkpoint import TEACHER_FILE, save_draft_student
from kforcing.students.draft.decode import generate_with_drafts
from kforcing.students.draft.distill import head_config
from kforcing.workflows.evaluate import EvalConfig, run_eval
from kforcing.decoding.generate import generate_ar
from kforcing.students.draft.student import DraftStudent
from kforcing.models.transformer import ARModel
from kforcing.workflows.report import eval_tables
from tiny_models import trained_teacher

SAMPLING = dict(temperature=0.7, top_k=50, top_p=0.9)
LEARNING_STEPS = 300
LEARNED_TOKENS_PER_PASS = 1.5  # k = 2: 1 + the acceptance of the one draft (1.68 measured; 1.07 untrained)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return trained_teacher(tmp_path_factory.mktemp("draft"))


def settings(teacher_run, out, **overrides):
    values = dict(teacher=str(teacher_run), out_dir=str(out), pathway="head", tau=(0.7, 0.7), top_k=50, top_p=0.9,
                  steps=[6], batch_size=4, seq_len=16, warmup_steps=2, eval_interval=3, eval_batches=1,
                  ar_eval_contexts=4, save_interval=100, log_interval=1, progress=False, device="cpu")
    values.update(overrides)
    if values["pathway"] == "head":
        values.setdefault("head_layers", 1)
    return DistillConfig(**values)


def head_weights(path):
    student, _, _ = load_model(path)
    return {name: value.clone() for name, value in student.head.state_dict().items()}


@pytest.mark.parametrize("pathway", ["head", "trunk", "onepass", "chain", "chain-draft-vocab"])
def test_a_draft_run_exports_a_student_that_verifies_exactly(teacher_run, tmp_path, pathway):
    sizes = {"trunk": dict(adapter_rank=2), "onepass": dict(adapter_rank=2),
             "chain-draft-vocab": dict(draft_vocab=64)}.get(pathway, {})
    pathway = pathway.split("-")[0]
    summary = distill(settings(teacher_run, tmp_path / "run", pathway=pathway, readout="categorical", **sizes))
    stage = summary["stages"][0]
    assert stage["k"] == 4 and stage["step"] == 6 and stage["pathway"] == pathway
    for key in ("val_tokens_per_pass", "verified_tokens_per_pass", "val_accept_2", "verified_accept_4"):
        assert key in stage and key in stage["initial"]
    student, tokenizer, config = load_model(tmp_path / "run")
    assert isinstance(student, DraftStudent) and student.head_config.pathway == pathway
    assert config["model_type"] == "draft" and config["teacher_fingerprint"] == student.fingerprint
    files = {path.name for path in (tmp_path / "run" / "stage_k4" / "final").iterdir()}
    assert TEACHER_FILE not in files and tokenizer is not None  # the teacher is referenced, never copied
    if "draft_vocab" in sizes:  # the training text's 64 most frequent tokens, saved with the head
        ids = student.head.draft_ids
        assert ids.tolist() == sorted(ids.tolist()) and len(set(ids.tolist())) == 64 and bool(ids.any())
    prompts = [[tokenizer.eos_id] + [5, 6, 7][:n] for n in (0, 3, 1)]
    ar = generate_ar(student.teacher, prompts, 20, seed=3, **SAMPLING)
    out = generate_with_drafts(student, prompts, 20, seed=3, **SAMPLING)
    assert torch.equal(out.tokens, ar.tokens)


def test_the_default_draft_vocabulary_is_an_eighth_of_a_large_vocabulary_and_kept_on_resume(tmp_path):
    """Left at the default, a chain student drafts from V/8 tokens when V >= 8192 and from all of them below; 0 asks
    for the whole vocabulary; a resumed run keeps what it was started with (the whole vocabulary for a run written
    before the default existed, whose distill.json says null)."""
    from types import SimpleNamespace

    from kforcing.students.draft.distill import resolve_draft_vocab

    def teacher(vocab):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))

    def resolve(vocab, given=None, saved="absent"):
        config = SimpleNamespace(draft_vocab=given)
        return resolve_draft_vocab(config, teacher(vocab), None if saved == "absent" else {"draft_vocab": saved})

    assert resolve(8192) == 1024 and resolve(50257) == 6282
    assert resolve(4096) == 0 and resolve(1024) == 0  # below 8192: the whole vocabulary
    assert resolve(8192, given=0) == 0 and resolve(1024, given=64) == 64  # given: as given
    assert resolve(8192, saved=None) == 0 and resolve(8192, saved=512) == 512  # resumed: the run's own


def test_draft_vocab_0_is_the_whole_vocabulary(teacher_run, tmp_path):
    whole = settings(teacher_run, tmp_path / "run", pathway="chain", draft_vocab=0)
    whole.validate()
    assert head_config(whole).draft_vocab is None


def test_a_trunk_run_resumes_with_its_own_adapter_rank_when_none_is_given(teacher_run, tmp_path):
    trunk = dict(pathway="trunk", readout="categorical", steps=[8], save_interval=4)
    distill(settings(teacher_run, tmp_path / "run", stop_after=4, adapter_rank=2, **trunk))
    resumed = settings(teacher_run, tmp_path / "run", resume=True, **trunk)  # no rank: the default would be 0
    distill(resumed)
    assert resumed.adapter_rank is None  # the caller's config is not changed behind its back
    student, _, _ = load_model(tmp_path / "run")
    assert student.head_config.adapter_rank == 2
    assert (tmp_path / "run" / "stage_k4" / "done.json").exists()


@pytest.mark.parametrize("options", [{}, dict(readout="onehot", windows="teacher", boundary_beta=0.5)],
                         ids=["default", "boundary-weighted"])
def test_resuming_a_draft_run_is_exact(teacher_run, tmp_path, options):
    distill(settings(teacher_run, tmp_path / "straight", steps=[8], save_interval=4, **options))
    distill(settings(teacher_run, tmp_path / "resumed", steps=[8], save_interval=4, stop_after=4, **options))
    assert not (tmp_path / "resumed" / "stage_k4" / "done.json").exists()
    with pytest.raises(DistillError, match="--resume"):
        distill(settings(teacher_run, tmp_path / "resumed", steps=[8], save_interval=4, **options))
    distill(settings(teacher_run, tmp_path / "resumed", steps=[8], save_interval=4, resume=True, **options))
    straight, resumed = head_weights(tmp_path / "straight"), head_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_resuming_past_the_requested_steps_finishes_with_a_message(teacher_run, tmp_path, capsys):
    """An interrupted run at step 4 resumed with --steps 2: nothing left to train, said in one line; the CLI's
    summary prints '-' for the metrics it did not measure instead of a traceback."""
    out = tmp_path / "run"
    distill(settings(teacher_run, out, steps=[8], save_interval=4, stop_after=4))
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teacher_run), "--out", str(out), "--resume", "--steps", "2",
                 "--pathway", "head", "--head-layers", "1", "--warmup", "2", "--batch-size", "4", "--seq-len", "16",
                 "--eval-batches", "1", "--ar-eval-contexts", "4", "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "is at step 4, which reaches the 2 steps asked for: nothing left to train" in err, err
    assert "Traceback" not in err and "stage k=4: " in err and (out / "stage_k4" / "done.json").is_file()


def test_progressive_growth_continues_the_same_head(teacher_run, tmp_path):
    summary = distill(settings(teacher_run, tmp_path / "run", schedule=[2, 4], steps=[3, 3]))
    assert [s["k"] for s in summary["stages"]] == [2, 4]
    assert summary["checkpoint"].endswith("stage_k4/final")
    first, second = head_weights(tmp_path / "run" / "stage_k2" / "final"), head_weights(tmp_path / "run")
    assert any(not torch.equal(first[name], second[name]) for name in first)


def test_a_head_refuses_another_teacher_and_a_merged_export_stands_alone(teacher_run, tmp_path):
    distill(settings(teacher_run, tmp_path / "run"))
    student, tokenizer, _ = load_model(tmp_path / "run")
    other = ARModel(student.config)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_model(tmp_path / "run", teacher=other)
    with torch.no_grad():  # one weight changed by a rounding step is another teacher too
        student.teacher.lm_head.weight[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match="only fits the exact teacher"):
        load_model(tmp_path / "run", teacher=student.teacher)
    student, _, _ = load_model(tmp_path / "run")
    save_draft_student(tmp_path / "merged", student, tokenizer, merged=True)
    other_tokenizer = train_tokenizer([text for _, text in iter_documents("stdlib", max_bytes=50_000)],
                                      vocab_size=tokenizer.vocab_size)
    save_draft_student(tmp_path / "retokenised", student, other_tokenizer,
                       provenance=Provenance("distill", 0, teacher=str(teacher_run), k=4))
    with pytest.raises(CheckpointError, match="tokenizer.json differs from its teacher's tokenizer"):
        load_model(tmp_path / "retokenised")
    moved = tmp_path / "moved_teacher"
    shutil.move(str(teacher_run), str(moved))
    try:
        with pytest.raises(CheckpointError, match="no longer exists"):
            load_model(tmp_path / "run")
        alone, _, _ = load_model(tmp_path / "merged")
        assert alone.fingerprint == student.fingerprint
        found, _, _ = load_model(tmp_path / "run", teacher=moved)
        assert found.fingerprint == student.fingerprint
    finally:
        shutil.move(str(moved), str(teacher_run))


def test_eval_of_a_chain_student_leaves_out_the_u_shuffle_test(teacher_run, tmp_path):
    distill(settings(teacher_run, tmp_path / "run", pathway="chain"))
    config = EvalConfig(teacher=str(teacher_run), student=str(tmp_path / "run"), num_samples=4, sample_len=12,
                        batch_size=4, batch_sizes=[1], speed_tokens=8, speed_repeats=1, progress=False, **SAMPLING)
    results = run_eval(config)
    assert all(row["equals_ar"] for row in results["verified"])
    assert results["diagnostics"]["shuffle"] is None and len(results["diagnostics"]["floor"]) == 3
    tables = eval_tables(results)
    assert "u-blind floor" in tables and "u-shuffle" not in tables


def test_eval_of_a_draft_student(teacher_run, tmp_path):
    distill(settings(teacher_run, tmp_path / "run"))
    config = EvalConfig(teacher=str(teacher_run), student=str(tmp_path / "run"), num_samples=4, sample_len=12,
                        batch_size=4, batch_sizes=[1], speed_tokens=8, speed_repeats=1, progress=False, **SAMPLING)
    results = run_eval(config)
    assert results["kind"] == "draft" and results["ks"] == [2, 4]
    assert all(row["equals_ar"] for row in results["verified"])
    diagnostics = results["diagnostics"]
    assert len(diagnostics["floor"]) == len(diagnostics["shuffle"]) == 3
    assert all(0.0 <= a <= 1.0 for a in diagnostics["floor"] + diagnostics["shuffle"])
    assert [row["k"] for row in results["quality"]] == [0, 2, 4]
    assert {row["decoder"] for row in results["speed"]} == {"AR", "verified k=2", "unverified k=2", "verified k=4",
                                                           "unverified k=4", "verified adaptive"}
    tables = eval_tables(results)
    assert "u-blind floor" in tables and "verified tokens per pass" in tables
    json.dumps(results)  # eval.json is plain data
    with pytest.raises(ValueError, match="--k 1 is not allowed"):
        run_eval(EvalConfig(**{**config.__dict__, "ks": [1]}))
    with pytest.raises(ValueError, match="--freq-penalty applies to push-forward students"):
        run_eval(EvalConfig(**{**config.__dict__, "freq_penalty": 1.0}))


def test_sample_cli_with_a_draft_student(teacher_run, tmp_path, capsys):
    distill(settings(teacher_run, tmp_path / "run"))
    common = ["sample", "--ckpt", str(tmp_path / "run"), "--max-new-tokens", "12", "--temperature", "0.7",
              "--top-k", "50", "--top-p", "0.9", "--no-stop", "--prompt", "def "]
    assert main(common + ["--verify"]) == 0
    verified = capsys.readouterr()
    assert main(["sample", "--ckpt", str(teacher_run), *common[3:]]) == 0
    assert capsys.readouterr().out == verified.out  # lossless: the teacher's own sample
    assert "verified K-Forcing, adaptive up to k=4" in verified.err  # no --k: adaptive drafting


@pytest.mark.parametrize("overrides, message", [
    (dict(tau=(0.7, 1.0)), "one sampling distribution"),
    (dict(schedule=[1, 2]), "must start at k >= 2"),
    (dict(schedule=[4, 2]), "must increase"),
    (dict(objective="noise-inversion"), r"--objective applies to the push-forward student's pathways \(full\), not to "
                                       "--pathway head"),
    (dict(pathway="trunk", adapter_rank=10_000), "adapter_rank=10000 is larger than the model width"),
    (dict(readout="argmax"), "unknown readout"),
    (dict(pathway="sideways"), "unknown pathway"),
    (dict(top_p=0.0), "top_p in"),
    (dict(adapter_rank=4), "--adapter-rank does not apply to --pathway head"),
    (dict(pathway="full", top_k=50),
     r"--top-k applies to the draft student's pathways \(chain, head, trunk, onepass\)"),
    (dict(pathway="full", top_k=None, top_p=None, draft_vocab=64),
     "--draft-vocab applies to the draft student's pathways"),
    (dict(pathway="chain", adapter_rank=4), "--adapter-rank does not apply to --pathway chain"),
    (dict(pathway="chain", windows="teacher"), "--windows does not apply to --pathway chain"),
    (dict(pathway="chain", readout="onehot"), "needs readout 'categorical'"),
    (dict(pathway="chain", draft_vocab=1), r"--draft-vocab must be 0 \(the whole vocabulary\) or at least 2"),
    (dict(pathway="chain", draft_vocab=10_000), "larger than the teacher's vocabulary"),
    (dict(draft_vocab=64), "draft_vocab applies to the chain pathway only"),
    (dict(pathway="trunk", readout="categorical", schedule=[2, 4]), "nothing to train below k = 3"),
    (dict(boundary_beta=0.5), "--boundary-beta needs --readout onehot --windows teacher"),
    (dict(readout="onehot", windows="student", boundary_beta=0.5), "--boundary-beta needs"),
    (dict(readout="onehot", windows="teacher", boundary_beta=0.0), "--boundary-beta must be positive"),
    (dict(pathway="full", top_k=None, top_p=None, boundary_beta=0.5),
     "--boundary-beta applies to the draft student's pathways"),
])
def test_bad_draft_settings(teacher_run, tmp_path, overrides, message):
    with pytest.raises(DistillError, match=message):
        distill(settings(teacher_run, tmp_path / "run", **overrides))
    assert not (tmp_path / "run" / "stage_k4").exists()


@pytest.mark.parametrize("pathway", ["head", "chain"])
def test_a_few_hundred_steps_raise_verified_tokens_per_pass(teacher_run, tmp_path, pathway):
    """Learning, measured the way a user would: verified decoding on held-out prompts before and after training."""
    config = settings(teacher_run, tmp_path / "run", pathway=pathway, readout="categorical", schedule=[2],
                      steps=[LEARNING_STEPS], batch_size=8, seq_len=32, lr=3e-3, warmup_steps=20,
                      eval_interval=LEARNING_STEPS, ar_eval_contexts=32, log_interval=50)
    stage = distill(config)["stages"][0]
    before, after = stage["initial"]["verified_tokens_per_pass"], stage["verified_tokens_per_pass"]
    assert after > LEARNED_TOKENS_PER_PASS and after > before + 0.3, (before, after)


def test_paper_is_one_flag_and_refuses_settings_it_would_ignore(teacher_run, tmp_path):
    config = DistillConfig(teacher=str(teacher_run), out_dir=str(tmp_path / "p"), paper=True)
    config.validate()
    assert (config.pathway, config.schedule, config.tau, config.objective) == ("full", [1, 2, 4], (1.0, 1.0),
                                                                               "self-forcing")
    for extra, flag in ((dict(top_k=5), "--top-k"), (dict(tau=(0.7, 0.7)), "--tau"), (dict(pathway="head"),
                                                                                        "--pathway"),
                        (dict(boundary_beta=0.5), "--boundary-beta")):
        with pytest.raises(DistillError, match=f"--paper fixes {flag}"):
            DistillConfig(teacher="t", out_dir="o", paper=True, **extra).validate()


def test_sample_and_eval_default_to_the_students_own_sampling(teacher_run, tmp_path, capsys):
    distill(settings(teacher_run, tmp_path / "run"))  # learnt at temperature 0.7, top-k 50, top-p 0.9
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--verify", "--max-new-tokens", "10", "--no-stop"]) == 0
    implicit = capsys.readouterr().out
    assert main(["sample", "--ckpt", str(teacher_run), "--max-new-tokens", "10", "--no-stop", *sum(
        ([f"--{k.replace('_', '-')}", str(v)] for k, v in SAMPLING.items()), [])]) == 0
    assert capsys.readouterr().out == implicit
    results = run_eval(EvalConfig(teacher=str(teacher_run), student=str(tmp_path / "run"), num_samples=2,
                                  sample_len=8, batch_size=2, batch_sizes=[], progress=False))
    assert results["sampling"] == {**SAMPLING, "order": "vocab"}
