"""Checkpoints and run directories: the one owner of every file name a stage writes and the next one reads.

A checkpoint is a directory:

    model.safetensors     the model's state dict
    config.json           {"format": "kforcing-checkpoint", "version": 3, "model_type": "ar" or a student kind's name,
                           "model": ModelConfig fields, ["max_k", "noise_num_freqs"],
                           "files": {file name: sha256 of every tensor file and of tokenizer.json},
                           "provenance": `Provenance` (what it was trained from),
                           "config_sha256": sha256 of the rest of config.json}
    tokenizer.json        the tokenizer (when one is given)
    optimizer.pt          the optimizer's state dict (training checkpoints)
    trainer_state.pt      step, RNG states, ... (training checkpoints)
    *.safetensors         further tensors of a training checkpoint (e.g. the raw weights beside EMA weights)

`save_checkpoint` writes everything into a hidden temporary directory beside the target and then renames it into
place, so a crash mid-save leaves the previous checkpoint untouched and never a half-written one; temporaries left
by a killed process are removed by `remove_stale_temporaries` when the next run starts. Every file a load reads is
checked against its sha256 (config.json against the one it carries): a missing, truncated, altered or unreadable
file is a `CheckpointError` naming the file and what is wrong.

A run directory (`RunLayout`) keeps its checkpoints in RUN/checkpoints/step_NNNNNNN and points to the newest through
RUN/latest.json, itself replaced atomically; `resolve_checkpoint(RUN)` follows that pointer. A distillation run
holds one such layout per stage (RUN/stage_kK) plus each stage's exported student (final/) and its summary.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from ..data import Tokenizer, load_tokenizer
from ..models.transformer import ARModel, ModelConfig, Transformer
from ..runtime import sha256_file, write_json_atomic

FORMAT = "kforcing-checkpoint"
# 3: config.json carries the sha256 of its own content and files{} lists tokenizer.json too; 2: sha256 of every
# tensor file and typed provenance; 1 had neither (all still readable)
VERSION = 3
CONFIG_CHECKSUM = "config_sha256"
LATEST = "latest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.pt"
# Every top-level key of a config.json any writer here emits (checkpoint fields, each model kind's export_config,
# version 1's "extra"); read_config warns about others.
_CONFIG_KEYS = {"format", "version", "model_type", "model", "files", "provenance", CONFIG_CHECKSUM, "extra", "max_k",
                "noise_num_freqs", "head", "teacher_fingerprint", "teacher_kind"}
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)\d+$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------------------------
# Run directories


def _file(name: str, doc: str = None) -> property:
    return property(lambda self: self.root / name, doc=doc)


_KIND_NAMES = {"teacher": "teacher run (kforcing train-teacher)", "distill": "student run (kforcing distill)"}


class RunLayout:
    """The file names of a training run (a teacher run, or one distillation stage) and of a distillation run."""

    checkpoints = _file("checkpoints")
    latest = _file(LATEST)
    metrics = _file("metrics.jsonl")
    tokenizer = _file("tokenizer.json")
    data = _file("data", "The token cache a run builds when it is given no other (train-teacher, distill --corpus).")
    tensorboard = _file("tensorboard")
    # A distillation run: RUN/distill.json and RUN/stage_kK/{... as above, final/, done.json}
    distill_settings = _file("distill.json")
    final = _file("final")
    done = _file("done.json")

    def __init__(self, root):
        self.root = Path(root)

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}"

    def stage(self, k: int) -> "RunLayout":
        return RunLayout(self.root / f"stage_k{k}")

    run_kind = _file("run.json", "The kind of run the folder holds: {\"kind\": \"teacher\" | \"distill\"}.")

    def kind(self) -> Optional[str]:
        """"teacher" or "distill" for a folder that holds a run (from run.json, or for folders written before it
        existed, from distill.json or a teacher's checkpoints), None for a new or empty folder."""
        if self.run_kind.is_file():
            try:
                return str(json.loads(self.run_kind.read_text())["kind"])
            except (ValueError, KeyError, TypeError) as error:
                raise CheckpointError(f"{self.run_kind} is not a run record ({error}); delete it if the folder "
                                      "is yours") from None
        if self.distill_settings.is_file():
            return "distill"
        if self.checkpoints.is_dir() or self.latest.is_file():
            return "teacher"
        return None

    def claim(self, kind: str, command: str):
        """Mark the folder as a run of `kind`, refusing a folder that holds a run of another kind (a teacher's
        folder is never a student's --out, nor the reverse): call it holding the run lock."""
        held = self.kind()
        if held not in (None, kind):
            raise CheckpointError(f"{self.root} holds a {_KIND_NAMES[held]}; kforcing {command} writes a "
                                  f"{_KIND_NAMES[kind]} and would overwrite its latest.json: choose another --out")
        if held is None or not self.run_kind.is_file():
            write_json_atomic(self.run_kind, {"kind": kind})

    def read_metrics(self) -> List[dict]:
        """The records of metrics.jsonl ([] when the run has none)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class Provenance:
    """What a checkpoint was trained from: the typed link by which a stage finds its predecessor's data.

    Attributes:
        stage: "teacher" (train-teacher) or "distill" (a student stage).
        step: optimizer steps the weights have seen.
        token_cache: absolute path of the token cache its batches or contexts came from.
        seq_len: the sequence (teacher) or context (student) length it was trained on.
        settings: the run's TrainConfig / DistillConfig, as JSON.
        teacher: for a student, the checkpoint it was distilled from.
        k: for a student, the tokens per pass of its stage.
        summary: for a finished stage's export, the stage summary (final metrics, budget).
    """

    stage: str
    step: int
    token_cache: Optional[str] = None
    seq_len: Optional[int] = None
    settings: dict = dataclasses.field(default_factory=dict)
    teacher: Optional[str] = None
    k: Optional[int] = None
    summary: Optional[dict] = None

    @classmethod
    def from_config(cls, config: dict) -> Optional["Provenance"]:
        """The provenance of a checkpoint's config.json; version-1 checkpoints kept it in an untyped "extra".

        Fields this version does not know (a newer kforcing's) are ignored with a warning naming them: provenance
        describes where a checkpoint came from and never changes what it computes."""
        if config.get("provenance"):
            data = config["provenance"]
            if not isinstance(data, dict):
                raise CheckpointError(f"config.json's provenance must be an object, got {type(data).__name__}")
            known = {field.name for field in dataclasses.fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                warnings.warn(f"config.json's provenance has fields this kforcing does not know ({', '.join(unknown)}"
                              f"; checkpoint version {config.get('version')}): ignored", stacklevel=2)
            missing = [name for name in ("stage", "step") if name not in data]
            if missing:
                raise CheckpointError(f"config.json's provenance lacks {', '.join(missing)}")
            for name in ("teacher", "token_cache"):
                if data.get(name) is not None and not isinstance(data[name], str):
                    raise CheckpointError(f"config.json's provenance.{name} must be a path (a string), got "
                                          f"{type(data[name]).__name__}")
            return cls(**{name: value for name, value in data.items() if name in known})
        extra = config.get("extra") or {}
        if "train" in extra:
            train = extra["train"]
            return cls("teacher", extra.get("step", 0), train.get("data_dir"), train.get("seq_len"), train)
        if "distill" in extra:
            summary = extra.get("summary")
            return cls("distill", extra.get("step", 0), extra.get("data_dir"),
                       (summary or {}).get("seq_len") or extra["distill"].get("seq_len"), extra["distill"],
                       extra["distill"].get("teacher"), extra.get("stage"), summary)
        return None


def remove_stale_temporaries(directory):
    """Delete the hidden temporaries (.NAME.tmpPID, .NAME.oldPID) that a save killed mid-way left in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if _TEMPORARY.match(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def write_latest(run_dir, checkpoint_dir, step):
    """Point RUN/latest.json at `checkpoint_dir` (atomically)."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / LATEST, {"checkpoint": os.path.relpath(checkpoint_dir, run_dir), "step": int(step)})


def find_resume_checkpoint(run_dir) -> Optional[Path]:
    """The checkpoint a `--resume` continues from: the one latest.json names, or, when latest.json is missing or
    names nothing usable (a crash between the save and the pointer), the newest complete RUN/checkpoints/step_N.
    None when the run has no complete checkpoint."""
    layout = RunLayout(run_dir)
    skipped = []
    if layout.latest.is_file():
        try:
            target = layout.root / json.loads(layout.latest.read_text())["checkpoint"]
            if is_complete(target):
                return target
            skipped.append(target)
        except (json.JSONDecodeError, KeyError, TypeError):
            skipped.append(layout.latest)
    found = None
    if layout.checkpoints.is_dir():
        steps = sorted((int(m[1]), p) for p in layout.checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, path in reversed(steps):
            if is_complete(path):
                found = path
                break
            if path not in skipped:
                skipped.append(path)
    if skipped:  # say what a resume passes over, so a restart from an older step (or from 0) is never silent
        print(f"kforcing: skipping {', '.join(map(str, skipped))} (incomplete or unreadable); "
              + (f"resuming from {found}" if found else "no complete checkpoint to resume from"), file=sys.stderr)
    return found


def is_complete(directory) -> bool:
    """Whether a checkpoint directory holds its config.json and every file the config lists."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return all((Path(directory) / name).is_file() for name in config.get("files", {MODEL_FILE: None}))


def prune_checkpoints(run_dir, keep_last: int, keep: Path):
    """Delete all but the newest `keep_last` step checkpoints of a run (never `keep`)."""
    checkpoints = RunLayout(run_dir).checkpoints
    steps = sorted(p for p in checkpoints.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    for path in steps[:-keep_last]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Saving


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cpu_state(module) -> Dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in module.state_dict().items()}


def _write_files(tmp: Path, model, tokenizer, optimizer, trainer_state, tensors) -> Dict[str, str]:
    """Write the tensor files (and the tokenizer) into `tmp`; returns {tensor file name: sha256}."""
    save_file(_cpu_state(model), str(tmp / MODEL_FILE), metadata={"format": FORMAT})
    for name, state in (tensors or {}).items():
        save_file(state, str(tmp / name))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer.json")
    return {path.name: sha256_file(path) for path in sorted(tmp.iterdir())
            if path.suffix in (".safetensors", ".pt") or path.name == "tokenizer.json"}


def _config_digest(config: dict) -> str:
    body = {key: value for key, value in config.items() if key != CONFIG_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal_config(config: dict) -> dict:
    """config with the sha256 of its content (config.json's own checksum: the settings a load computes with are
    part of the checkpoint, as its tensors are)."""
    return {**config, CONFIG_CHECKSUM: _config_digest(config)}


def save_checkpoint(directory, model: Transformer, tokenizer: Optional[Tokenizer] = None, optimizer=None,
                    trainer_state: Optional[dict] = None, provenance: Optional[Provenance] = None,
                    tensors: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> Path:
    """Write a checkpoint directory atomically (see the module docstring); returns its path.

    Args:
        directory: the checkpoint directory to create (replaced if it exists).
        model: a Transformer or a draft head (a DDP/compiled wrapper's `.module`/`._orig_mod` is unwrapped).
        tokenizer: saved as tokenizer.json.
        optimizer: its state_dict is saved as optimizer.pt.
        trainer_state: a dict of tensors/numbers saved as trainer_state.pt (step, RNG states, ...).
        provenance: what the model was trained from (config.json "provenance").
        tensors: further {file name (*.safetensors): state dict} to keep in the checkpoint.
    """
    model = unwrap(model)
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    existed = directory.exists()
    try:
        _save_into(directory, tmp, model, tokenizer, optimizer, trainer_state, provenance, tensors)
    except OSError as error:  # a full disk, a read-only folder: one clear error, and whatever was there stays
        reason = error.strerror or str(error)
        where = f" ({error.filename})" if error.filename else ""
        raise CheckpointError(f"could not save the checkpoint {directory}: {reason}{where}; "
                              + ("the checkpoint that was there is intact" if existed else "nothing was written there")
                              ) from error
    return directory


def _save_into(directory: Path, tmp: Path, model, tokenizer, optimizer, trainer_state, provenance, tensors):
    """save_checkpoint's work: write into `tmp`, then swap it in for `directory` (restoring the old one if the swap
    fails); `tmp` never outlives the call."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = _write_files(tmp, model, tokenizer, optimizer, trainer_state, tensors)
        config = {"format": FORMAT, "version": VERSION, **model.export_config(), "files": files,
                  "provenance": dataclasses.asdict(provenance) if provenance else None}
        write_json_atomic(tmp / "config.json", seal_config(config))
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if directory.exists():  # replacing a checkpoint of the same name: move the old one aside first
            old = directory.with_name(f".{directory.name}.old{os.getpid()}")
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except OSError:
                os.replace(old, directory)  # the previous checkpoint goes back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def unwrap(model):
    """The plain model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------------------
# Loading


def describe_source(path) -> str:
    """How results and provenance name a model argument: a Hugging Face spec ("hf:...") as given, a checkpoint or run
    directory as its resolved checkpoint directory."""
    from ..teachers.hf_teacher import is_hf_spec

    return path if is_hf_spec(path) else str(resolve_checkpoint(path))


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from a checkpoint directory or a run directory (through its latest.json)."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        try:
            target = path / json.loads(latest.read_text())["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{latest} is unreadable ({error})") from None
        if not (target / "config.json").is_file():
            raise CheckpointError(f"{latest} points to {target}, which is not a checkpoint")
        return target
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    raise CheckpointError(f"no checkpoint at {path}: expected a checkpoint directory (with config.json) or a run "
                          f"directory (with {LATEST})")


def read_config(path) -> dict:
    """The config.json of a checkpoint (or of a run's latest checkpoint)."""
    directory = resolve_checkpoint(path)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{directory}/config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        what = config.get("format") if isinstance(config, dict) else None
        raise CheckpointError(f"{directory} is not a kforcing checkpoint (config.json format {what!r})")
    if config.get("version", 0) > VERSION:
        raise CheckpointError(f"{directory} has checkpoint version {config['version']}; this kforcing reads "
                              f"up to {VERSION}: upgrade kforcing")
    if config.get("version", 0) >= 3 and config.get(CONFIG_CHECKSUM) != _config_digest(config):
        raise CheckpointError(f"{directory}/config.json was changed after the checkpoint was saved (its content does "
                              "not match the checksum it carries): its settings decide what the weights compute, so "
                              "restore the file rather than edit it")
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:  # every key that decides a computation is known or refused below it (model, head); others describe
        warnings.warn(f"{directory}/config.json has keys this kforcing does not know ({', '.join(unknown)}; "
                      f"checkpoint version {config.get('version')}): ignored", stacklevel=2)
    return config


def read_provenance(path) -> Optional[Provenance]:
    """What the checkpoint at `path` (or a run's latest) was trained from; None for a bare saved model."""
    return Provenance.from_config(read_config(path))


def load_file_checked(directory, name: str, loader: Callable[[Path], object], config: Optional[dict] = None):
    """loader(path) of one tensor file of a checkpoint, after checking it against its recorded sha256.

    Every failure (missing, checksum mismatch, truncated or garbage content) is a CheckpointError naming the file.
    """
    directory = Path(directory)
    path = directory / name
    config = read_config(directory) if config is None else config
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    expected = config.get("files", {}).get(name)
    if expected is None and config.get("version", 1) >= 2:
        raise CheckpointError(f"{path} is not listed in {directory}/config.json: it does not belong to the checkpoint")
    if expected is not None and sha256_file(path) != expected:
        raise CheckpointError(f"{path} is corrupt: its sha256 does not match the one recorded in config.json")
    try:
        return loader(path)
    except Exception as error:  # safetensors / pickle errors have no common base class
        raise CheckpointError(f"{path} is unreadable ({type(error).__name__}: {error})") from None


def load_torch_file(directory, name: str, device="cpu"):
    """A checked torch.load (weights only) of optimizer.pt / trainer_state.pt."""
    return load_file_checked(directory, name, lambda p: torch.load(p, map_location=device, weights_only=True))


def load_tensors(directory, name: str, device="cpu") -> Dict[str, torch.Tensor]:
    """A checked safetensors file of a checkpoint as a state dict on `device`."""
    return load_file_checked(directory, name, lambda p: load_file(str(p), device=str(device)))


def describe_config_difference(a: ModelConfig, b: ModelConfig) -> str:
    """'n_layer: 2 vs 6, n_embd: ...' for the fields where two configs differ."""
    a, b = a.to_dict(), b.to_dict()
    return ", ".join(f"{key}: {a[key]} vs {b[key]}" for key in a if a[key] != b[key])


def load_weights(model, path, strict: bool = True):
    """Load a checkpoint's weights into `model` (a Transformer or a HintHead), with an error naming every
    mismatching tensor."""
    directory = resolve_checkpoint(path)
    config = read_config(directory)
    mine = model.export_config()
    saved_kind, my_kind = config.get("teacher_kind", "kforcing"), mine.get("teacher_kind", "kforcing")
    if saved_kind != my_kind:
        raise CheckpointError(f"checkpoint {directory} was made for a {saved_kind} teacher; this "
                              f"{type(model).__name__} is for a {my_kind} teacher")
    if my_kind == "hf":  # the shape of a Hugging Face teacher (kforcing.teachers.hf_teacher.HFModelConfig), as a dict
        if config["model"] != mine["model"]:
            difference = ", ".join(f"{key}: {config['model'].get(key)} vs {value}"
                                   for key, value in mine["model"].items() if config["model"].get(key) != value)
            raise CheckpointError(f"checkpoint {directory} was made for another model ({difference}; checkpoint vs "
                                  "model)")
    else:
        saved_config, model_config = ModelConfig.from_dict(config["model"]), ModelConfig.from_dict(mine["model"])
        if saved_config != model_config:
            raise CheckpointError(f"checkpoint {directory} was made for another model config "
                                  f"({describe_config_difference(saved_config, model_config)}; checkpoint vs model)")
    if (config.get("head") is None) != (mine.get("head") is None):
        kinds = {"ar": "an AR model", "pushforward": "a push-forward student", "draft": "a draft student"}
        saved = kinds.get(config.get("model_type"), f"a {config.get('model_type')!r} model")
        raise CheckpointError(f"checkpoint {directory} holds {saved}, which does not fit the {type(model).__name__} "
                              "it is being loaded into")
    if mine.get("head") is not None:
        # compared as the head's config class (its `config`): fields added since the checkpoint take their defaults
        settings = type(model.config)
        saved_head, model_head = settings.from_dict(config["head"]), settings.from_dict(mine["head"])
        if saved_head != model_head:
            raise CheckpointError(f"checkpoint {directory} holds a head with settings {saved_head}, not {model_head}")
    state = load_file_checked(directory, MODEL_FILE, lambda p: load_file(str(p), device=str(_device_of(model))),
                              config)
    expected = model.state_dict()
    problems = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
                for key, value in expected.items() if key in state and state[key].shape != value.shape]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if problems or (strict and (missing or unexpected)):
        raise CheckpointError(f"checkpoint {directory} does not fit this {type(model).__name__}: "
                              f"shape mismatches {problems}, missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=strict)
    return model


def build_ar_model(spec) -> ARModel:
    """Rebuild an untrained AR model from `export_config()`'s dict (the "config.json" of a teacher checkpoint)."""
    if not isinstance(spec, dict) or "model_type" not in spec or "model" not in spec:
        raise ValueError("a model spec needs 'model_type' and 'model' keys (is this a kforcing checkpoint?)")
    if spec["model_type"] != "ar":
        raise ValueError(f"model_type {spec['model_type']!r} is not an AR model")
    return ARModel(ModelConfig.from_dict(spec["model"]))


def _device_of(model) -> torch.device:
    return next(iter(model.state_dict().values())).device


def load_built_model(directory, config: dict, build: Callable[[dict], torch.nn.Module], device="cpu",
                     dtype: Optional[torch.dtype] = None, with_tokenizer: bool = True):
    """(model in eval mode, tokenizer or None, config) of a checkpoint whose model `build(config)` makes from its
    config.json alone (`directory` resolved, `config` its config.json): an AR teacher (`build_ar_model`) or a
    student that holds all its weights (e.g. a push-forward student)."""
    try:
        model = build(config)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {directory} (version {config.get('version')}): {error}") from None
    model.to(device)
    load_weights(model, directory)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), checkpoint_tokenizer(directory, with_tokenizer), config


def load_ar_model(directory, config: dict, device="cpu", dtype: Optional[torch.dtype] = None,
                  with_tokenizer: bool = True):
    """`load_built_model` of an AR teacher checkpoint. Students and Hugging Face models load through
    `kforcing.workflows.loading.load_model`."""
    return load_built_model(directory, config, build_ar_model, device, dtype, with_tokenizer)


def checkpoint_tokenizer(directory: Path, wanted: bool) -> Optional[Tokenizer]:
    """The tokenizer.json saved with a checkpoint, when `wanted` and there is one (checked against its sha256 when
    config.json lists it)."""
    if not wanted or not (directory / "tokenizer.json").is_file():
        return None
    config = read_config(directory)
    if "tokenizer.json" in config.get("files", {}):
        return load_file_checked(directory, "tokenizer.json", load_tokenizer, config)
    return load_tokenizer(directory / "tokenizer.json")  # written before version 3


__all__ = ["CONFIG_CHECKSUM", "CheckpointError", "LATEST", "Provenance", "RunLayout", "build_ar_model",
           "checkpoint_tokenizer", "describe_config_difference", "describe_source", "find_resume_checkpoint",
           "is_complete", "load_ar_model", "load_built_model", "load_file_checked", "load_tensors", "load_torch_file",
           "load_weights", "prune_checkpoints", "read_config", "read_provenance", "remove_stale_temporaries",
           "resolve_checkpoint", "save_checkpoint", "seal_config", "sha256_file", "unwrap", "write_latest"]
