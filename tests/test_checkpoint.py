"""kforcing.checkpoints.checkpoint: checksums verified on load, clear errors for broken files, resuming without
latest.json, clean-up of interrupted saves, and training that stops on a non-finite loss before saving anything."""

import json
import shutil

import pytest
import torch

import kforcing.checkpoints.checkpoint as ckpt
from kforcing.workflows.loading import load_model
import kforcing.training.trainer
from kforcing.data import iter_documents, train_tokenizer
from kforcing.training.train import TrainConfig, train_teacher
from kforcing.training.trainer import TrainingError

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

CORPUS_BYTES = 200_000


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    texts = [text for _, text in iter_documents("stdlib", max_bytes=CORPUS_BYTES)]
    return {"tokenizer": str(train_tokenizer(texts, vocab_size=300).save(root)), "data_dir": str(root / "data")}


def config(out, shared, **overrides):
    settings = dict(out_dir=str(out), corpus=["stdlib"], corpus_max_bytes=CORPUS_BYTES, tokenizer=shared["tokenizer"],
                    data_dir=shared["data_dir"], seq_len=16, batch_size=2, steps=4, warmup_steps=1, eval_interval=4,
                    eval_batches=1, save_interval=2, log_interval=1, progress=False, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def run(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "teacher"
    train_teacher(config(out, shared))
    return out


def copy_of(run, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(ckpt.resolve_checkpoint(run), directory)
    return directory


def test_every_tensor_file_has_a_checksum(run):
    directory = ckpt.resolve_checkpoint(run)
    files = ckpt.read_config(directory)["files"]
    assert set(files) == {"model.safetensors", "optimizer.pt", "trainer_state.pt", "tokenizer.json"}
    assert all(len(digest) == 64 for digest in files.values())


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:64]), "is corrupt: its sha256 does not match"),
    (lambda p: p.write_bytes(b"garbage" * 100), "is corrupt: its sha256 does not match"),
    (lambda p: p.unlink(), "is missing: the checkpoint is incomplete"),
])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.pt"])
def test_broken_files_are_checkpoint_errors_naming_the_file(run, tmp_path, damage, message, name):
    directory = copy_of(run, tmp_path)
    damage(directory / name)
    with pytest.raises(ckpt.CheckpointError, match=message) as error:
        if name == "model.safetensors":
            load_model(directory)
        else:
            ckpt.load_torch_file(directory, name)
    assert str(directory / name) in str(error.value)


def test_unreadable_content_with_a_matching_checksum(run, tmp_path):
    directory = copy_of(run, tmp_path)
    (directory / "optimizer.pt").write_bytes(b"not a pickle")
    config = json.loads((directory / "config.json").read_text())
    config["files"]["optimizer.pt"] = ckpt.sha256_file(directory / "optimizer.pt")
    (directory / "config.json").write_text(json.dumps(ckpt.seal_config(config)))
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.pt is unreadable \("):
        ckpt.load_torch_file(directory, "optimizer.pt")


def test_resume_without_latest_json_continues_from_the_newest_complete_checkpoint(shared, tmp_path, monkeypatch,
                                                                                    capsys):
    out = tmp_path / "teacher"
    train_teacher(config(out, shared, steps=6, stop_after=4))
    (out / "latest.json").unlink()
    incomplete = out / "checkpoints" / "step_0000005"  # a later checkpoint without its files is passed over
    shutil.copytree(out / "checkpoints" / "step_0000004", incomplete)
    (incomplete / "model.safetensors").unlink()
    stale = [out / "checkpoints" / ".step_0000006.tmp4242", out / "checkpoints" / ".step_0000002.old4242"]
    for path in stale:
        path.mkdir()
    (out / ".latest.json.tmp4242").write_text("{")
    resumed_from = []
    original = kforcing.training.trainer.Trainer.resume
    monkeypatch.setattr(kforcing.training.trainer.Trainer, "resume",
                        lambda self, directory: resumed_from.append(directory.name) or original(self, directory))
    capsys.readouterr()
    summary = train_teacher(config(out, shared, steps=6, resume=True))
    assert resumed_from == ["step_0000004"] and summary["step"] == 6
    err = capsys.readouterr().err  # the skipped checkpoint is named, with the one resumed from
    assert f"kforcing: skipping {incomplete} (incomplete or unreadable); resuming from " in err, err
    assert not any(path.exists() for path in stale) and not (out / ".latest.json.tmp4242").exists()


def test_a_non_finite_loss_stops_training_before_anything_is_saved(shared, tmp_path, monkeypatch):
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    out = tmp_path / "teacher"
    with pytest.raises(TrainingError, match="non-finite loss at step 1"):
        train_teacher(config(out, shared, save_interval=1))
    assert not (out / "latest.json").exists() and not list(out.glob("checkpoints/step_*"))


def test_weights_of_another_kind_of_model_are_refused_in_plain_words(tmp_path):
    from kforcing.students.draft.student import DraftStudent, HeadConfig
    from kforcing.models.transformer import ARModel, ModelConfig

    teacher = ARModel(ModelConfig.from_preset("tiny", vocab_size=64, max_seq_len=32))
    ckpt.save_checkpoint(tmp_path, teacher)
    student = DraftStudent.from_teacher(teacher, HeadConfig(pathway="chain", num_layers=1))
    with pytest.raises(ckpt.CheckpointError, match="holds an AR model, which does not fit the ChainHead it is being "
                                                   "loaded into"):
        ckpt.load_weights(student.head, tmp_path)


def test_config_and_tokenizer_are_covered_by_checksums(run, tmp_path):
    """config.json carries the sha256 of its own content and lists tokenizer.json's: editing a setting (here the
    model's rope base) or swapping two vocabulary entries is a CheckpointError naming the file, not another
    computation loaded silently. Checkpoints from before version 3 load unchecked."""
    directory = copy_of(run, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    assert config["version"] == 3 and len(config[ckpt.CONFIG_CHECKSUM]) == 64
    edited = dict(config, model=dict(config["model"], rope_base=500.0))
    (directory / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ckpt.CheckpointError, match="config.json was changed after the checkpoint was saved"):
        load_model(directory)
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    text = json.dumps(tokenizer)
    (directory / "tokenizer.json").write_text(text.replace('"def"', '"DEF"', 1) if '"def"' in text else text + " ")
    with pytest.raises(ckpt.CheckpointError, match=r"tokenizer.json is corrupt: its sha256 does not match"):
        load_model(directory)
    older = {key: value for key, value in config.items() if key != ckpt.CONFIG_CHECKSUM}
    older["version"] = 2
    older["files"] = {name: digest for name, digest in config["files"].items() if name != "tokenizer.json"}
    (directory / "config.json").write_text(json.dumps(older))
    model, tokenizer, _ = load_model(directory)  # a version-2 checkpoint: config and tokenizer unchecked
    assert tokenizer is not None


def test_provenance_from_a_newer_or_damaged_config():
    """Unknown provenance fields (a newer kforcing's) are ignored with a warning naming them; a provenance without
    its stage, or with a teacher that is not a path, is a CheckpointError naming the field."""
    base = {"stage": "distill", "step": 3, "teacher": "runs/teacher", "k": 4}
    with pytest.warns(UserWarning, match=r"does not know \(future_field; checkpoint version 3\): ignored"):
        provenance = ckpt.Provenance.from_config({"version": 3, "provenance": {**base, "future_field": 1}})
    assert provenance == ckpt.Provenance("distill", 3, teacher="runs/teacher", k=4)
    with pytest.raises(ckpt.CheckpointError, match="provenance lacks stage"):
        ckpt.Provenance.from_config({"provenance": {"step": 3}})
    with pytest.raises(ckpt.CheckpointError, match=r"provenance.teacher must be a path \(a string\), got int"):
        ckpt.Provenance.from_config({"provenance": {**base, "teacher": 7}})



def test_a_failed_save_leaves_the_checkpoint_that_was_there(run, tmp_path, monkeypatch):
    """A save that fails mid-way (a full disk) is one CheckpointError saying so, and the checkpoint of that name
    still loads with its old weights; a first save that fails leaves nothing."""
    model, tokenizer, _ = load_model(run)
    target = tmp_path / "ckpt"
    ckpt.save_checkpoint(target, model, tokenizer)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    real_replace = ckpt.os.replace

    def full_disk(source, destination):
        if str(source).startswith(str(tmp_path / ".ckpt.tmp")) or str(source).startswith(str(tmp_path / ".new.tmp")):
            raise OSError(28, "No space left on device", str(destination))
        return real_replace(source, destination)

    monkeypatch.setattr(ckpt.os, "replace", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"could not save the checkpoint .*ckpt: No space left on device "
                                                   r"\(.*\); the checkpoint that was there is intact"):
        ckpt.save_checkpoint(target, model, tokenizer)
    with pytest.raises(ckpt.CheckpointError, match="nothing was written there"):
        ckpt.save_checkpoint(tmp_path / "new", model, tokenizer)
    monkeypatch.undo()
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    reloaded, _, _ = load_model(target)
    assert all(torch.equal(reloaded.state_dict()[name], value) for name, value in before.items())


def test_unknown_config_keys_are_refused_where_they_compute_and_ignored_with_a_warning_elsewhere(run, tmp_path):
    """A config.json from a newer kforcing (sealed as it would seal it): an unknown model field is a CheckpointError
    naming the field and the checkpoint version; an unknown top-level key is ignored with a warning naming it."""
    def copy_with(edit):
        directory = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ckpt.resolve_checkpoint(run), directory)
        config = json.loads((directory / "config.json").read_text())
        config.pop(ckpt.CONFIG_CHECKSUM)
        edit(config)
        (directory / "config.json").write_text(json.dumps(ckpt.seal_config(config)))
        return directory

    computing = copy_with(lambda config: config["model"].update(sliding_window=64))
    with pytest.raises(ckpt.CheckpointError, match=r"\(version 3\): ModelConfig: unknown field\(s\) "
                                                   r"\['sliding_window'\], from a newer kforcing"):
        load_model(computing)
    describing = copy_with(lambda config: config.update(trained_on="a newer machine"))
    with pytest.warns(UserWarning, match=r"keys this kforcing does not know \(trained_on; checkpoint version 3\): "
                                         "ignored"):
        model, _, _ = load_model(describing)
    assert model is not None
