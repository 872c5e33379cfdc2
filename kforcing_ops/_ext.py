"""Loads the compiled extension `kforcing_ops._C` once, and says which kernels it holds.

Importing this module never initialises CUDA: which kernels exist is read from the dispatcher.
"""

import contextlib
import json
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_REBUILD = "rebuild from the repository root with: pip install --no-build-isolation -e ."
_ISA_RANK = {"default": 0, "avx2": 1, "avx512": 2}

# Ops whose public function may fall back to the reference (the *_backward ops are internal).
PUBLIC_OPS = ("inverse_cdf_sample", "window_attention", "window_attention_decode", "noise_embedding",
              "noise_conditioned_embedding", "decode_linear")


def _read_build_info():
    path = _HERE / "_build_info.json"
    if not path.exists():
        raise ImportError(f"kforcing_ops: the C++ extension has not been built; {_REBUILD}")
    return json.loads(path.read_text())


def _check_build_matches_runtime(info):
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"kforcing_ops was built against torch {info['torch_version']} but torch {torch.__version__} "
            f"is running; {_REBUILD}"
        )
    running = torch.backends.cpu.get_cpu_capability().lower()
    if _ISA_RANK[info["cpu_isa"]] > _ISA_RANK.get(running, 0):
        raise ImportError(
            f"kforcing_ops was built for {info['cpu_isa']} CPUs but this CPU supports {running}; "
            f"rebuild here with: KFORCING_CPU_ISA={running} pip install --no-build-isolation -e ."
        )


BUILD_INFO = _read_build_info()
_check_build_matches_runtime(BUILD_INFO)
try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as error:
    raise ImportError(f"kforcing_ops: loading the compiled extension failed ({error}); {_REBUILD}") from error


def _has_kernel(op, dispatch_key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kforcing::{op}", dispatch_key)


# {op: {"cpu": bool, "cuda": bool}}: constants, so torch.compile folds the dispatch decision away.
KERNELS = {op: {"cpu": _has_kernel(op, "CPU"), "cuda": _has_kernel(op, "CUDA")} for op in PUBLIC_OPS}


def has_kernel(op, device):
    """Whether `op` has a compiled kernel for tensors on `device`."""
    return KERNELS[op].get(device.type, False)


_warned = set()
_reference_requested = False


def use_kernel(op, device):
    """Whether the public function of `op` runs its compiled kernel for tensors on `device`.

    False inside `use_reference()`, and, after a one-time warning, where this build has no kernel for the device
    (the pure-PyTorch reference then runs).
    """
    if _reference_requested:
        return False
    if has_kernel(op, device):
        return True
    warn_fallback(op, device)
    return False


@contextlib.contextmanager
def use_reference():
    """Inside this block every public op runs `kforcing_ops.reference` instead of its kernel (tests, debugging).

    Models built on the public functions need no switch of their own: `with kforcing_ops.use_reference(): model(x)`.
    """
    global _reference_requested
    previous, _reference_requested = _reference_requested, True
    try:
        yield
    finally:
        _reference_requested = previous


def warn_fallback(op, device):
    """One warning per (op, device type) when the pure-PyTorch reference stands in for a kernel."""
    if (op, device.type) in _warned:
        return
    _warned.add((op, device.type))
    hint = (
        " Build with CUDA kernels (KFORCING_OPS_CUDA=1) to use them; `python -m kforcing_ops.info` shows the build."
        if device.type == "cuda" else ""
    )
    warnings.warn(
        f"kforcing_ops.{op}: this build has no {device.type} kernel for it, so the pure-PyTorch reference runs "
        f"instead (same results, slower, more memory).{hint}",
        RuntimeWarning,
        stacklevel=4,
    )
