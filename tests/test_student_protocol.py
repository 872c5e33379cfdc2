"""The Student protocol: every kind implements it, and a third kind plugged into the registry is trained, loaded,
sampled, evaluated and reported by the unchanged workflows (distill, load_model, sample, eval, report)."""

import inspect
import json

import pytest
import torch

import tiny_models
from kforcing.checkpoints import checkpoint as ckpt
from kforcing.cli.commands import main
from kforcing.decoding.generate import generate_ar
from kforcing.models.transformer import ARModel, ModelConfig
from kforcing.students import registry
from kforcing.students.protocol import StudentKind
from kforcing.training.schedule import run_stages
from kforcing.training.stage_task import DistillError
from kforcing.workflows.distill import DistillConfig, distill
from kforcing.workflows.evaluate import EvalConfig, run_eval
from kforcing.workflows.loading import load_model
from kforcing.workflows.report import eval_tables, write_eval_report

TINY = ModelConfig.from_preset("tiny", vocab_size=97, max_seq_len=64)


class CopyStudent(ARModel):
    """The smallest possible student: an exact copy of its teacher, one token per round."""

    model_type = "copy"
    max_k = 1


class CopyKind(StudentKind):
    """A third kind, written the way a new student package would be (only the protocol, nothing else edited)."""

    name = "copy"
    title = "copy student"
    pathways = ("copy",)
    model_class = CopyStudent
    options = {}
    default_schedule = [1]

    def __init__(self):
        self.calls = []

    def load(self, directory, config, teacher=None, device="cpu"):
        self.calls.append("load")
        model, tokenizer, _ = ckpt.load_built_model(directory, config, self.build, device)
        return model, tokenizer

    def build(self, spec):
        return CopyStudent(ModelConfig.from_dict(spec["model"]))

    def configure(self, config):
        self.calls.append("configure")
        config.tau = config.tau or (1.0, 1.0)

    def check_run(self, config, teacher, teacher_id, info):
        self.calls.append("check_run")
        if not isinstance(teacher, ARModel):
            raise DistillError("a copy student needs a kforcing teacher")

    def distill(self, run):
        self.calls.append("distill")

        def train(index, k, steps, stage_layout, steps_before):
            student = CopyStudent(run.teacher.config)
            student.load_state_dict(run.teacher.state_dict())
            ckpt.save_checkpoint(stage_layout.final, student, run.tokenizer)
            stage_layout.done.write_text(json.dumps({"k": k, "steps_budget": steps, "step": steps}))
            return {"k": k, "steps_budget": steps, "step": steps}

        return run_stages(run, train, lambda stage_layout: None)

    def generate(self, student, prompts, max_new_tokens, *, k=None, seed=0, temperature=1.0, top_k=0, top_p=1.0,
                 order="vocab", verify=False, freq_penalty=0.0, eos_id=None, pad_id=0, sequence_ids=None):
        self.calls.append("generate")
        return generate_ar(student, prompts, max_new_tokens, seed=seed, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_id=eos_id, pad_id=pad_id, sequence_ids=sequence_ids, order=order)

    def store_weights(self, student, dtype, draft_dtype):
        self.calls.append("store_weights")

    def check_eval(self, config, models):
        self.calls.append("check_eval")

    def trained_sampling(self, provenance):
        return {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "order": "vocab"}

    def evaluate(self, config, models, dataset, prompts, results):
        self.calls.append("evaluate")
        ours = self.generate(models.student, prompts, 8, seed=config.seed).tokens
        theirs = generate_ar(models.teacher, prompts, 8, seed=config.seed).tokens
        results["copy"] = {"equal_to_ar": bool(torch.equal(ours, theirs))}
        return results

    def eval_tables(self, results):
        return f"### Copy student\n\nequal to AR: {results['copy']['equal_to_ar']}\n"

    def plot_eval(self, results, out):
        return {}


def test_every_kind_implements_the_whole_protocol():
    kinds = registry.student_kinds()
    assert [kind.name for kind in kinds] == ["pushforward", "draft"]
    for kind in kinds:
        assert isinstance(kind, StudentKind) and not inspect.isabstract(type(kind))
        assert kind.name and kind.title and kind.pathways and kind.default_schedule
        assert registry.kind_named(kind.name) is kind
        assert all(registry.kind_for_pathway(pathway) is kind for pathway in kind.pathways)
    assert len(set(registry.pathways())) == len(registry.pathways())
    assert registry.kind_of(ARModel(TINY)) is None
    with pytest.raises(KeyError, match="unknown student kind 'rnn'; known: pushforward, draft"):
        registry.kind_named("rnn")
    with pytest.raises(KeyError, match="unknown pathway 'sideways'"):
        registry.kind_for_pathway("sideways")


def test_a_third_kind_runs_through_the_unchanged_workflows(tmp_path, monkeypatch, capsys):
    copy = CopyKind()
    monkeypatch.setattr(registry, "KINDS", registry.KINDS + (copy,))
    teacher_run = tiny_models.trained_teacher(tmp_path, steps=10)
    out = tmp_path / "copy"
    with pytest.raises(DistillError, match="--objective applies to the push-forward student's pathways"):
        DistillConfig(teacher=str(teacher_run), out_dir=str(out), pathway="copy",
                      objective="noise-inversion").validate()
    summary = distill(DistillConfig(teacher=str(teacher_run), out_dir=str(out), pathway="copy", steps=[3],
                                    progress=False, device="cpu"))
    assert summary["stages"] == [{"k": 1, "steps_budget": 3, "step": 3}]
    assert copy.calls == ["configure", "check_run", "distill"]  # the refused flag failed before configure

    student, tokenizer, config = load_model(out)  # latest.json -> stage_k1/final, model_type "copy"
    assert isinstance(student, CopyStudent) and config["model_type"] == "copy" and tokenizer is not None

    assert main(["sample", "--ckpt", str(out), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "generate" in copy.calls and "=== sample 0.0" in capsys.readouterr().out

    results = run_eval(EvalConfig(teacher=str(teacher_run), student=str(out), num_samples=2, sample_len=8,
                                  contexts=4, batch_sizes=[], progress=False, device="cpu"))
    assert results["kind"] == "copy" and results["ks"] == [1] and results["copy"] == {"equal_to_ar": True}
    assert {"check_eval", "store_weights", "evaluate"} <= set(copy.calls)
    assert "equal to AR: True" in eval_tables(results)
    paths = write_eval_report(results, tmp_path / "eval")
    assert "### Copy student" in (tmp_path / "eval" / "eval.md").read_text() and set(paths) == {"markdown"}


def test_a_checkpoint_of_an_unknown_kind_is_a_clear_error(tmp_path):
    student = CopyStudent(TINY)
    ckpt.save_checkpoint(tmp_path / "copy", student)
    with pytest.raises(ckpt.CheckpointError, match=r"holds a model of type 'copy', which this kforcing does not know "
                                                    r"\(it knows ar, pushforward, draft\)"):
        load_model(tmp_path / "copy")
