"""Build kforcing_ops._C: CPU kernels always, CUDA kernels whenever they can be built.

Install with `pip install --no-build-isolation -e .` (torch is deliberately not a build requirement:
the extension must be compiled against the torch you will run it with).

Environment knobs (all optional; README "Environment knobs" has the table):
  KFORCING_OPS_CUDA=0|1   0: never build CUDA kernels. 1: build them or fail loudly.
                          Unset: build them when torch is a CUDA build and a matching nvcc is found.
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0+PTX". Default: the visible GPUs, else DEFAULT_CUDA_ARCHS.
  KFORCING_CPU_ISA        avx512 | avx2 | default. Default: what torch reports for this CPU.
  MAX_JOBS                parallel compile jobs. Default: from cores and RAM (nvcc needs ~3 GB a job).
  CUDA_HOME               the CUDA toolkit; found from nvcc or /usr/local/cuda when unset.
  KFORCING_GIT_SHA        the commit recorded in the build info, for trees copied without .git.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
except ImportError:
    sys.exit(
        "kforcing: PyTorch is not importable in this build environment. Install torch first, "
        "then build without isolation: pip install --no-build-isolation -e ."
    )

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # sm_80 SASS also runs on 8.6/8.9; PTX 9.0 JITs on newer GPUs.
GB_PER_NVCC_JOB = 3
GENERATED = ROOT / "build" / "generated"


def log(msg):
    print(f"kforcing build: {msg}", flush=True)


def locate_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin fools it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = Path(nvcc).resolve().parent.parent if nvcc else None
    if guess and (guess / "include" / "cuda_runtime_api.h").exists():
        return
    if Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        log("CUDA_HOME not set; using /usr/local/cuda")


locate_cuda_home()
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)


def nvcc_version():
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


def why_no_cuda():
    """None when CUDA kernels can be built, else the reason they cannot."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"
    version = nvcc_version()
    if version is None:
        return f"could not run {cpp_extension.CUDA_HOME}/bin/nvcc"
    torch_major = int(torch.version.cuda.split(".")[0])
    if version[0] != torch_major:
        return f"nvcc {version[0]}.{version[1]} does not match torch's CUDA {torch.version.cuda}"
    return None


def decide_cuda():
    wanted = os.environ.get("KFORCING_OPS_CUDA", "")
    if wanted not in ("", "0", "1"):
        sys.exit(f"kforcing build: KFORCING_OPS_CUDA must be 0 or 1, got {wanted!r}")
    if wanted == "0":
        log("CUDA kernels disabled by KFORCING_OPS_CUDA=0")
        return False
    reason = why_no_cuda()
    if reason and wanted == "1":
        sys.exit(f"kforcing build: KFORCING_OPS_CUDA=1 but CUDA kernels cannot be built: {reason}")
    if reason:
        log(f"building CPU kernels only: {reason}")
        return False
    return True


def decide_arch_list():
    """Honour TORCH_CUDA_ARCH_LIST; else the visible GPUs; else an explicit default including 9.0."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            archs = ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
        else:
            archs = DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    log(f"CUDA architectures: {archs}")
    return archs


CPU_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx2"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "default": [],
}


def decide_cpu_isa():
    """The vector ISA of the CPU kernels (at::vec::Vectorized); the import checks the CPU has it."""
    isa = os.environ.get("KFORCING_CPU_ISA", "").lower()
    if not isa:
        isa = torch.backends.cpu.get_cpu_capability().lower()
    if isa not in CPU_ISA_FLAGS:
        isa = "default"
    log(f"CPU kernels vectorised for: {isa}")
    return isa


def default_max_jobs():
    if os.environ.get("MAX_JOBS"):
        return
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    jobs = max(1, min(cores, int(mem_gb // GB_PER_NVCC_JOB)))
    os.environ["MAX_JOBS"] = str(jobs)
    log(f"MAX_JOBS={jobs} (set MAX_JOBS to override)")


def git_sha():
    if os.environ.get("KFORCING_GIT_SHA"):  # a copied tree (no .git) can still say what it was built from
        return os.environ["KFORCING_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cuda_header_dirs():
    """The CUDA headers torch includes (cusparse.h, cublas_v2.h...) may ship in nvidia-* wheels."""
    site = Path(torch.__file__).resolve().parent.parent
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]


def sources(with_cuda):
    cpp = ["csrc/registration.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.cu")) if with_cuda else []
    return cpp + cu


def build_info(with_cuda, archs, cpu_isa):
    return {
        "version": VERSION,
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "python_version": sys.version.split()[0],
        "cuda_kernels": with_cuda,
        "nvcc_version": ".".join(map(str, nvcc_version())) if with_cuda else None,
        "cuda_arch_list": archs,
        "cpu_isa": cpu_isa,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def make_extension():
    with_cuda = decide_cuda()
    archs = decide_arch_list() if with_cuda else None
    cpu_isa = decide_cpu_isa()
    default_max_jobs()
    info = json.dumps(build_info(with_cuda, archs, cpu_isa))
    # The JSON lets _ext check the torch version before it loads _C; the header feeds the
    # kforcing::build_info op, so the binary itself says how it was built (CMakeLists.txt does the same).
    (ROOT / "kforcing_ops" / "_build_info.json").write_text(info + "\n")
    GENERATED.mkdir(parents=True, exist_ok=True)
    header = f'#pragma once\n#define KFORCING_BUILD_INFO_JSON R"kfjson({info})kfjson"\n'
    (GENERATED / "kforcing_build_info.h").write_text(header)

    capability = {"avx512": "AVX512", "avx2": "AVX2", "default": "DEFAULT"}[cpu_isa]
    defines = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}", "-DKFORCING_PYTHON_MODULE"]
    cxx = ["-O3", "-fopenmp", *CPU_ISA_FLAGS[cpu_isa], *defines]
    kwargs = dict(
        name="kforcing_ops._C",
        sources=sources(with_cuda),
        include_dirs=[str(ROOT / "csrc" / "include"), str(GENERATED)],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if not with_cuda:
        return cpp_extension.CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    nvcc = [
        "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DKFORCING_WITH_CUDA",
        f"--threads={min(4, int(os.environ['MAX_JOBS']))}",
    ]
    kwargs["include_dirs"] += cuda_header_dirs()
    return cpp_extension.CUDAExtension(
        extra_compile_args={"cxx": cxx + ["-DKFORCING_WITH_CUDA"], "nvcc": nvcc}, **kwargs)


class BuildExtension(cpp_extension.BuildExtension):
    def run(self):
        if not cpp_extension.is_ninja_available():
            sys.exit("kforcing build: ninja is required (pip install ninja); it makes the build minutes, not hours")
        super().run()


VERSION = "0.1.0"

setup(
    version=VERSION,
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
