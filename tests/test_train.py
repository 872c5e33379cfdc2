"""kforcing.training.train and kforcing.checkpoints.checkpoint: the tiny teacher learns, resuming is exact, DDP, atomic
checkpoints."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kforcing.checkpoints.checkpoint as ckpt
from kforcing.workflows.loading import load_model
from kforcing.data import iter_documents, train_tokenizer
from kforcing.models.transformer import ARModel, ModelConfig
from kforcing.training.train import TrainConfig, lr_at, train_teacher
from kforcing.training.trainer import Trainer
from tolerances import CHANCE_LOSS_ABS, DDP_LOSS_ABS, DDP_WEIGHTS

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

REPO = Path(__file__).resolve().parents[1]
SMALL_CORPUS = 300_000  # bytes of the default corpus for the short runs


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tokenizer file and a token cache shared by the short runs (so they do not re-tokenise)."""
    root = tmp_path_factory.mktemp("shared")
    texts = [text for _, text in iter_documents("stdlib", max_bytes=SMALL_CORPUS)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    return {"tokenizer": str(tokenizer.save(root)), "data_dir": str(root / "data")}


def short_config(out, shared, **overrides):
    settings = dict(out_dir=str(out), preset="tiny", corpus=["stdlib"], corpus_max_bytes=SMALL_CORPUS,
                    tokenizer=shared["tokenizer"], data_dir=shared["data_dir"], seq_len=32, batch_size=4, steps=8,
                    warmup_steps=2, eval_interval=4, eval_batches=2, save_interval=100, log_interval=1,
                    progress=False, device="cpu", dropout=0.1)
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(run_dir):
    return load_file(str(ckpt.resolve_checkpoint(run_dir) / "model.safetensors"))


def test_lr_schedule():
    config = TrainConfig(out_dir="x", lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(0.55e-3)  # halfway down the cosine
    assert lr_at(110, config) == pytest.approx(1e-4)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 110))


def test_tiny_teacher_learns_on_the_default_corpus(tmp_path):
    out = tmp_path / "teacher"
    config = TrainConfig(out_dir=str(out), preset="tiny", corpus=["stdlib"], corpus_max_bytes=1_500_000,
                         vocab_size=1024, seq_len=64, batch_size=16, steps=120, warmup_steps=10, eval_interval=60,
                         eval_batches=4, save_interval=60, log_interval=20, progress=False, device="cpu")
    summary = train_teacher(config)
    assert summary["step"] == 120
    first, last = summary["first_val_loss"], summary["val_loss"]
    assert first == pytest.approx(torch.log(torch.tensor(1024.0)).item(), abs=CHANCE_LOSS_ABS)  # chance level at init
    assert last < first - 1.5 and last < 5.5, (first, last)  # a clear drop after 120 tiny steps (seconds of CPU)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 60, 120]
    assert [r["step"] for r in records if "train_loss" in r] == [20, 40, 60, 80, 100, 120]
    # The run directory: tokenizer, token cache, checkpoints (the last two kept), latest.json.
    assert (out / "tokenizer.json").is_file() and (out / "data" / "meta.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000060", "step_0000120"]
    directory = ckpt.resolve_checkpoint(out)
    assert directory.name == "step_0000120"
    assert {p.name for p in directory.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                                    "optimizer.pt", "trainer_state.pt"}
    model, tokenizer, config_json = load_model(out)
    assert isinstance(model, ARModel) and not model.training
    assert config_json["provenance"]["settings"]["steps"] == 120 and tokenizer.vocab_size == 1024
    # The model learned the corpus: Python source is far more likely than shuffled tokens.
    ids = torch.tensor([tokenizer.encode("import os\nimport sys\n\n\ndef main():\n    return 0\n")])
    loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    shuffled = ids[:, torch.randperm(ids.shape[1])]
    assert loss < torch.nn.functional.cross_entropy(model(shuffled)[0, :-1], shuffled[0, 1:]) - 1.0


def test_resume_is_exact(tmp_path, shared, capsys):
    straight = train_teacher(short_config(tmp_path / "straight", shared))
    first = train_teacher(short_config(tmp_path / "split", shared, stop_after=4))
    assert first["step"] == 4 and ckpt.resolve_checkpoint(tmp_path / "split").name == "step_0000004"
    resumed = train_teacher(short_config(tmp_path / "split", shared, resume=True))
    assert "changed settings" not in capsys.readouterr().err
    assert straight["step"] == resumed["step"] == 8
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit, dropout RNG included
    opt_a = torch.load(ckpt.resolve_checkpoint(tmp_path / "straight") / "optimizer.pt", weights_only=True)
    opt_b = torch.load(ckpt.resolve_checkpoint(tmp_path / "split") / "optimizer.pt", weights_only=True)
    for i, state in opt_a["state"].items():
        assert torch.equal(state["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"])
    # The metrics of the split run read like one run (throughput aside).
    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    assert records("split") == records("straight")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_saves_its_last_step_and_resumes_exactly(tmp_path, shared, monkeypatch, signal_number):
    straight = train_teacher(short_config(tmp_path / "straight", shared))
    step, handler = Trainer._train_step, signal.getsignal(signal_number)

    def step_then_signal(self, window):  # the signal arrives while step 3 runs
        result = step(self, window)
        if self.step == 3:
            os.kill(os.getpid(), signal_number)
        return result

    monkeypatch.setattr(Trainer, "_train_step", step_then_signal)
    with pytest.raises(KeyboardInterrupt, match="checkpoint at step 3 .*--resume"):
        train_teacher(short_config(tmp_path / "split", shared))
    assert ckpt.resolve_checkpoint(tmp_path / "split").name == "step_0000003"
    assert signal.getsignal(signal_number) == handler  # the run's handlers are gone
    monkeypatch.undo()
    resumed = train_teacher(short_config(tmp_path / "split", shared, resume=True))
    assert straight["step"] == resumed["step"] == 8
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_and_output_directory_errors(tmp_path, shared, capsys):
    out = tmp_path / "run"
    train_teacher(short_config(out, shared, steps=2))
    with pytest.raises(ValueError, match="already holds a training run; pass --resume"):
        train_teacher(short_config(out, shared, steps=2))
    with pytest.raises(ckpt.CheckpointError, match=r"another model config \(n_layer: 2 vs 6"):
        train_teacher(short_config(out, shared, steps=4, preset="small", resume=True))
    train_teacher(short_config(out, shared, steps=3, lr=1e-3, resume=True))  # allowed, with a warning
    assert "resuming with changed settings (steps: 2 -> 3; lr: None -> 0.001)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stop_after"):
        short_config(out, shared, stop_after=20).validate()
    with pytest.raises(ValueError, match="unknown --config"):
        short_config(out, shared, preset="huge").validate()
    with pytest.raises(ValueError, match="seq_len=300 exceeds"):
        train_teacher(short_config(tmp_path / "long", shared, seq_len=300))


def test_checkpoint_save_is_atomic(tmp_path, shared, monkeypatch):
    out = tmp_path / "run"
    train_teacher(short_config(out, shared, steps=2))
    good = ckpt.resolve_checkpoint(out)
    before = weights(out)
    model, tokenizer, _ = load_model(out)

    def crash(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(ckpt.CheckpointError, match="disk full; the checkpoint that was there is intact"):
        ckpt.save_checkpoint(good, model, tokenizer)  # overwriting the same checkpoint
    with pytest.raises(ckpt.CheckpointError, match="disk full; nothing was written there"):
        ckpt.save_checkpoint(out / "checkpoints" / "step_0000009", model, tokenizer)
    assert ckpt.resolve_checkpoint(out) == good
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [good.name]  # no temporary left behind


def test_load_errors(tmp_path, shared):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="expected a checkpoint directory"):
        load_model(tmp_path / "empty")
    out = tmp_path / "run"
    train_teacher(short_config(out, shared, steps=1))
    other = ARModel(ModelConfig.from_preset("tiny", vocab_size=512, n_layer=3))
    with pytest.raises(ckpt.CheckpointError, match=r"another model config \(n_layer: 2 vs 3"):
        ckpt.load_weights(other, out)
    config = json.loads((ckpt.resolve_checkpoint(out) / "config.json").read_text())
    config["format"] = "something-else"
    (ckpt.resolve_checkpoint(out) / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="not a kforcing checkpoint"):
        load_model(out)


def test_ddp_two_cpu_processes_match_one_process_with_accumulation(tmp_path, shared):
    """torchrun, 2 processes on gloo, batch b each == 1 process, batch b, grad_accum 2 (the same global batch)."""
    args = ["train-teacher", "--config", "tiny", "--corpus", "stdlib", "--corpus-max-mb", str(SMALL_CORPUS / 1e6),
            "--tokenizer", shared["tokenizer"], "--data-dir", shared["data_dir"], "--seq-len", "32",
            "--batch-size", "4", "--steps", "4", "--warmup", "2", "--eval-interval", "2", "--eval-batches", "2",
            "--log-interval", "1", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kforcing.cli", *args, "--out", str(tmp_path / "ddp")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train_teacher(short_config(tmp_path / "single", shared, steps=4, grad_accum=2, eval_interval=2, dropout=None))
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], **DDP_WEIGHTS, msg=name)
    state = torch.load(ckpt.resolve_checkpoint(tmp_path / "ddp") / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    ddp_losses = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one_losses = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ddp_losses, one_losses):
        for key in ("train_loss", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=DDP_LOSS_ABS)


def test_tensorboard_is_optional(tmp_path, shared):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="--tensorboard needs the tensorboard package"):
            train_teacher(short_config(tmp_path / "run", shared, steps=1, tensorboard=True))
    else:
        train_teacher(short_config(tmp_path / "run", shared, steps=1, tensorboard=True))
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_bf16_autocast_training_runs(tmp_path, shared):
    """The GPU default (bf16 autocast) exercised on CPU: same code path, the loss stays finite and falls."""
    summary = train_teacher(short_config(tmp_path / "run", shared, steps=6, dtype="bfloat16", eval_interval=6))
    assert summary["val_loss"] < summary["first_val_loss"]
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "run").values())
    assert all(t.dtype == torch.float32 for t in weights(tmp_path / "run").values())  # master weights stay fp32
