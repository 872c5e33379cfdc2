"""Process plumbing every stage shares: which device to run on, atomic file writes, one writer per run directory, the
git commit.

One definition of each, so that `kforcing train-teacher`, `distill`, `eval` and `demo` resolve `--device` alike
and write their JSON files the same crash-safe way.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu; `cuda` without an index -> this process's local rank.

    Raises ValueError (a one-line CLI error) when a CUDA device is asked for and none is visible.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was requested but no CUDA GPU is visible (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


LOCK_FILE = ".kforcing.lock"


class RunLockedError(ValueError):
    """Another process is writing into the run directory."""


@contextlib.contextmanager
def run_lock(directory, command: str):
    """Hold the run directory for one writer: an advisory lock (fcntl.flock) on directory/.kforcing.lock for the
    whole block, which the system releases when the process ends, however it ends (kill -9 included). A second
    writer gets RunLockedError naming the holder ("kforcing distill (pid 1234)"). Creates the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(f"{directory} is in use by {holder}: one run writes into a directory at a time; wait "
                             "for it to end, or choose another --out") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"kforcing {command} (pid {os.getpid()})")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def write_text_atomic(path, text: str) -> Path:
    """Write `text` to `path` through a hidden temporary file and a rename: readers see the old or the new file,
    never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


class StateFileError(ValueError):
    """A run's own JSON file (settings, a finished stage's record, a demo's state) cannot be read."""


def read_json(path) -> dict:
    """A run's JSON file, or StateFileError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StateFileError(f"{path} is not valid JSON ({error}); restore it, or delete the run and start again") \
            from None
    if not isinstance(data, dict):
        raise StateFileError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_sha(directory=None) -> Optional[str]:
    """The commit of the checkout holding `directory` (default: this package); KFORCING_GIT_SHA overrides it (a
    copied tree has no .git). None when it cannot be told."""
    if os.environ.get("KFORCING_GIT_SHA"):
        return os.environ["KFORCING_GIT_SHA"]
    cwd = Path(directory) if directory else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: torch.device) -> Dict:
    """Where a measurement ran: device, torch and Python versions, CPU threads (and the GPU's name)."""
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


__all__ = ["git_sha", "machine_info", "resolve_device", "sha256_file", "write_json_atomic", "write_text_atomic"]
