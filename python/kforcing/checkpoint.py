"""Checkpoints: safetensors weights + JSON config + tokenizer (+ optimizer and trainer state), saved atomically.

A checkpoint is a directory:

    model.safetensors     the model's state dict
    config.json           {"format": "kforcing-checkpoint", "version": 1, "model_type": "ar" | "pushforward",
                           "model": ModelConfig fields, ["max_k", "noise_num_freqs"], "extra": {...}}
    tokenizer.json        the tokenizer (when one is given)
    optimizer.pt          the optimizer's state dict (training checkpoints)
    trainer_state.pt      step, RNG states, ... (training checkpoints)

`save_checkpoint` writes everything into a hidden temporary directory beside the target and then renames it into
place, so a crash mid-save leaves the previous checkpoint untouched and never a half-written one. A training run
keeps its checkpoints in RUN/checkpoints/step_NNNNNNN and points to the newest through RUN/latest.json, itself
replaced atomically; `resolve_checkpoint(RUN)` follows that pointer.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .data import Tokenizer, load_tokenizer
from .model import ModelConfig, Transformer, build_model

FORMAT = "kforcing-checkpoint"
VERSION = 1
LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


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


def _write_json(path: Path, data):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory, model: Transformer, tokenizer: Optional[Tokenizer] = None, optimizer=None,
                    trainer_state: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """Write a checkpoint directory atomically (see the module docstring); returns its path.

    Args:
        directory: the checkpoint directory to create (replaced if it exists).
        model: an ARModel or PushForwardLM (a DDP/compiled wrapper's `.module`/`._orig_mod` is unwrapped).
        tokenizer: saved as tokenizer.json.
        optimizer: its state_dict is saved as optimizer.pt.
        trainer_state: a dict of tensors/numbers saved as trainer_state.pt (step, RNG states, ...).
        extra: JSON-serialisable metadata stored under config.json's "extra" (e.g. the training config).
    """
    model = unwrap(model)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        config = {"format": FORMAT, "version": VERSION, **model.export_config(), "extra": extra or {}}
        _write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if directory.exists():  # replacing a checkpoint of the same name: move the old one aside first
            old = directory.with_name(f".{directory.name}.old{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def unwrap(model):
    """The plain model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def write_latest(run_dir, checkpoint_dir, step):
    """Point RUN/latest.json at `checkpoint_dir` (atomically)."""
    run_dir = Path(run_dir)
    _write_json(run_dir / LATEST, {"checkpoint": os.path.relpath(checkpoint_dir, run_dir), "step": int(step)})


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from a checkpoint directory or a run directory (through its latest.json)."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        try:
            target = path / json.loads(latest.read_text())["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
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
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{directory}/config.json is not valid JSON ({error})") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a kforcing checkpoint (config.json format {config.get('format')!r})")
    if config.get("version", 0) > VERSION:
        raise CheckpointError(f"{directory} has checkpoint version {config['version']}; this kforcing reads "
                              f"up to {VERSION}: upgrade kforcing")
    return config


def describe_config_difference(a: ModelConfig, b: ModelConfig) -> str:
    """'n_layer: 2 vs 6, n_embd: ...' for the fields where two configs differ."""
    a, b = a.to_dict(), b.to_dict()
    return ", ".join(f"{key}: {a[key]} vs {b[key]}" for key in a if a[key] != b[key])


def load_weights(model: Transformer, path, strict: bool = True):
    """Load a checkpoint's weights into `model`, with an error naming every mismatching tensor."""
    directory = resolve_checkpoint(path)
    config = read_config(directory)
    saved_config = ModelConfig.from_dict(config["model"])
    if saved_config != model.config:
        raise CheckpointError(f"checkpoint {directory} was made for another model config "
                              f"({describe_config_difference(saved_config, model.config)}; checkpoint vs model)")
    state = load_file(str(directory / "model.safetensors"), device=str(model.device))
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


def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None, with_tokenizer: bool = True):
    """(model in eval mode, tokenizer or None, config dict) from a checkpoint or run directory."""
    directory = resolve_checkpoint(path)
    config = read_config(directory)
    try:
        model = build_model(config)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {directory}: {error}") from None
    model.to(device)
    load_weights(model, directory)
    if dtype is not None:
        model.to(dtype)
    tokenizer = None
    if with_tokenizer and (directory / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(directory / "tokenizer.json")
    return model.eval(), tokenizer, config


__all__ = ["CheckpointError", "load_model", "load_weights", "read_config", "resolve_checkpoint", "save_checkpoint",
           "unwrap", "write_latest"]
