"""Convergence against the references (as Liger-Kernel tests its kernels): a tiny teacher and a tiny student stage
trained for a few dozen steps twice, on the kernels and under `kforcing_ops.use_reference()`, log the same loss at
every step, within tolerances.CONVERGENCE_LOSS_RTOL."""

import json

import pytest

import kforcing_ops
from kforcing.data import iter_documents, train_tokenizer
from kforcing.workflows.distill import DistillConfig, distill
from kforcing.training.train import TrainConfig, train_teacher
from tolerances import CONVERGENCE_LOSS_RTOL

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

CORPUS_BYTES = 200_000


def losses(metrics_path):
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def assert_same_curve(kernel, reference):
    assert [s for s, _ in kernel] == [s for s, _ in reference] and len(kernel) >= 20
    for (step, a), (_, b) in zip(kernel, reference):
        assert a == pytest.approx(b, rel=CONVERGENCE_LOSS_RTOL), f"step {step}: kernels {a} vs reference {b}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convergence")
    texts = [text for _, text in iter_documents("stdlib", max_bytes=CORPUS_BYTES)]
    tokenizer = str(train_tokenizer(texts, vocab_size=300).save(root))

    def teacher(out):
        return train_teacher(TrainConfig(
            out_dir=str(root / out), corpus=["stdlib"], corpus_max_bytes=CORPUS_BYTES, tokenizer=tokenizer,
            data_dir=str(root / "data"), seq_len=32, batch_size=4, steps=30, warmup_steps=3, eval_interval=30,
            eval_batches=1, save_interval=30, log_interval=1, progress=False, device="cpu", dropout=0.1))

    def student(out, teacher_dir):
        return distill(DistillConfig(
            teacher=str(teacher_dir), out_dir=str(root / out), pathway="full", schedule=[1],
            steps=[24], batch_size=4, seq_len=16,
            warmup_steps=3, eval_interval=24, eval_batches=1, ar_eval_contexts=0, save_interval=24, log_interval=1,
            progress=False, device="cpu"))

    teacher("teacher_kernels")
    with kforcing_ops.use_reference():
        teacher("teacher_reference")
    student("student_kernels", root / "teacher_kernels")
    with kforcing_ops.use_reference():
        student("student_reference", root / "teacher_kernels")
    return root


def test_teacher_loss_curve_matches_the_references(runs):
    assert_same_curve(losses(runs / "teacher_kernels" / "metrics.jsonl"),
                      losses(runs / "teacher_reference" / "metrics.jsonl"))


def test_student_stage_loss_curve_matches_the_references(runs):
    assert_same_curve(losses(runs / "student_kernels" / "stage_k1" / "metrics.jsonl"),
                      losses(runs / "student_reference" / "stage_k1" / "metrics.jsonl"))
