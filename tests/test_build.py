"""The build: the extension loaded, says how it was built, rejects a mismatched runtime, and CMake builds it."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kforcing_ops
from kforcing_ops import _ext

ROOT = Path(__file__).resolve().parent.parent


def test_extension_built_and_cpu_kernels_registered():
    assert _ext.BUILD_INFO["torch_version"] == torch.__version__
    assert _ext.KERNELS["inverse_cdf_sample"]["cpu"], "the C++ CPU sampler is not registered"
    assert json.loads(torch.ops.kforcing.build_info()) == _ext.BUILD_INFO


def test_cuda_kernels_compiled_as_the_build_says():
    assert _ext.KERNELS["inverse_cdf_sample"]["cuda"] == _ext.BUILD_INFO["cuda_kernels"]
    if os.environ.get("KFORCING_REQUIRE_CUDA_BUILD") == "1":  # set by .ci/run
        assert _ext.BUILD_INFO["cuda_kernels"], "CI demands the CUDA kernels, but this build has none"
        archs = _ext.BUILD_INFO["cuda_arch_list"]
        assert archs
        # CI compiles sm_75 as well: the tensor-core code must keep its sm_80 guard.
        assert "7.5" in {arch.removesuffix("+PTX") for arch in archs.replace(";", " ").split()}, archs


def test_import_initialises_no_cuda():
    code = "import torch, kforcing_ops, kforcing_ops.nn; assert not torch.cuda.is_initialized(); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_mismatched_torch_asks_for_a_rebuild():
    info = dict(_ext.BUILD_INFO, torch_version="2.0.0")
    with pytest.raises(ImportError, match="built against torch 2.0.0.*rebuild.*pip install --no-build-isolation"):
        _ext._check_build_matches_runtime(info)


def test_cpu_without_the_built_isa_asks_for_a_rebuild(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.raises(ImportError, match="built for avx512 CPUs.*KFORCING_CPU_ISA=default"):
        _ext._check_build_matches_runtime(dict(_ext.BUILD_INFO, cpu_isa="avx512"))


def test_missing_kernel_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(_ext.KERNELS, "inverse_cdf_sample", {"cpu": False, "cuda": False})
    monkeypatch.setattr(_ext, "_warned", set())
    logits, u = torch.randn(3, 20), torch.rand(3)
    with pytest.warns(RuntimeWarning, match="no cpu kernel.*reference runs instead"):
        got = kforcing_ops.inverse_cdf_sample(logits, u)
    assert torch.equal(got, kforcing_ops.reference.inverse_cdf_sample(logits, u))
    with torch.autograd.profiler.profile() as prof, warnings.catch_warnings():  # once only; the C++ op is skipped
        warnings.simplefilter("error")
        kforcing_ops.inverse_cdf_sample(logits, u)
    assert "kforcing::inverse_cdf_sample" not in {e.name for e in prof.function_events}


def test_use_reference_runs_the_reference_silently_and_restores_the_kernels():
    logits, u = torch.randn(3, 20), torch.rand(3)
    with kforcing_ops.use_reference(), warnings.catch_warnings(), torch.autograd.profiler.profile() as prof:
        warnings.simplefilter("error")  # asked for: no fallback warning
        got = kforcing_ops.inverse_cdf_sample(logits, u)
    assert "kforcing::inverse_cdf_sample" not in {e.name for e in prof.function_events}
    assert torch.equal(got, kforcing_ops.reference.inverse_cdf_sample(logits, u))
    with torch.autograd.profiler.profile() as prof:
        kforcing_ops.inverse_cdf_sample(logits, u)
    assert "kforcing::inverse_cdf_sample" in {e.name for e in prof.function_events}


def test_info_command():
    run = lambda *args: subprocess.run([sys.executable, "-m", "kforcing_ops.info", *args],  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout
    table = run()
    for needle in ("built with", torch.__version__, "CPU kernels", "CUDA kernels", "inverse_cdf_sample",
                   "kforcing::window_attention_decode"):
        assert needle in table
    info = json.loads(run("--json"))
    assert info["built"]["torch_version"] == torch.__version__
    assert "how kforcing_ops was built" in run("--help")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_loads_with_torch_ops_load_library(tmp_path):
    """CMakeLists.txt builds the same sources into a library torch.ops.load_library can load (CPU kernels here;
    scripts/gpu_check.sh is where CUDA runs)."""
    prefix = torch.utils.cmake_prefix_path
    configure = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={prefix}",
                 "-DKFORCING_WITH_CUDA=OFF", f"-DKFORCING_CPU_ISA={_ext.BUILD_INFO['cpu_isa']}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for command in (configure, ["cmake", "--build", str(tmp_path), "-j", "2"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    library = tmp_path / "libkforcing_ops.so"
    logits, u = torch.randn(7, 333), torch.rand(7, dtype=torch.float64)
    torch.save({"logits": logits, "u": u}, tmp_path / "inputs.pt")
    # A fresh process: this one already registered the kforcing ops through kforcing_ops._C.
    code = (f"import json, torch; torch.ops.load_library({str(library)!r}); "
            f"x = torch.load({str(tmp_path / 'inputs.pt')!r}); "
            "print(json.dumps({'info': json.loads(torch.ops.kforcing.build_info()), 'tokens': "
            "torch.ops.kforcing.inverse_cdf_sample(x['logits'], x['u'], None, 1.0, 0, 1.0).tolist()}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["info"]["builder"] == "cmake" and loaded["info"]["cuda_kernels"] is False
    assert loaded["tokens"] == kforcing_ops.inverse_cdf_sample(logits, u).tolist()
