"""Shared test helpers: device parametrisation, the `cuda` marker, and proof of which implementation ran."""

import contextlib

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kforcing_ops
from kforcing_ops import _ext

HAS_GPU = torch.cuda.is_available()
CUDA_KERNELS = bool(_ext.BUILD_INFO["cuda_kernels"])

# Parametrise over this: CPU always, CUDA only on a GPU machine (`pytest -m cuda` in scripts/gpu_check.sh).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if HAS_GPU and CUDA_KERNELS:
        return
    reason = "needs a CUDA GPU" if not HAS_GPU else "this build has no CUDA kernels"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def expect_kernel(*ops):
    """Asserts that each kforcing op was dispatched to its C++ kernel inside the block.

    The public functions call `torch.ops.kforcing.<op>` only when a compiled kernel exists for the device, and
    fall back to `kforcing_ops.reference` otherwise; the profiler sees the dispatch, so a silent fallback fails.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    seen = {event.name for event in prof.events()}
    for op in ops:
        assert f"kforcing::{op}" in seen, f"kforcing::{op} did not run (the reference stood in for it)"


__all__ = ["DEVICES", "HAS_GPU", "CUDA_KERNELS", "expect_kernel", "kforcing_ops"]
