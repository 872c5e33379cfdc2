"""`python -m kforcing_ops.info`: how kforcing_ops was built, which kernels it holds, and what is running."""

import argparse
import json
import platform
import sys

import torch


def collect():
    from . import _ext

    built = json.loads(torch.ops.kforcing.build_info())
    return {
        "built": built,
        "running": {
            "torch_version": torch.__version__,
            "torch_cuda_version": torch.version.cuda,
            "python_version": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
        },
        "kernels": _ext.KERNELS,
        "registered_ops": sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kforcing::")),
    }


def render(info):
    built, running = info["built"], info["running"]
    lines = [
        f"kforcing_ops {built.get('version', '?')} (git {built.get('git_sha', '?')})",
        "",
        "built with",
        f"  torch          {built['torch_version']} (CUDA {built.get('torch_cuda_version') or 'none'})",
        f"  python         {built.get('python_version', '?')}",
        f"  nvcc           {built.get('nvcc_version') or '-'}",
        f"  CPU kernels    yes, vectorised for {built['cpu_isa']}",
        f"  CUDA kernels   {'yes' if built['cuda_kernels'] else 'no'}",
        f"  CUDA archs     {built.get('cuda_arch_list') or '-'}",
        "",
        "running",
        f"  torch          {running['torch_version']} (CUDA {running['torch_cuda_version'] or 'none'})",
        f"  python         {running['python_version']}",
        f"  CPU            {running['cpu_capability']}",
        f"  GPUs           {', '.join(running['cuda_devices']) or 'none visible'}",
        "",
        "kernels per op (cpu / cuda; 'reference' = the pure-PyTorch fallback runs)",
    ]
    for op, devices in info["kernels"].items():
        cells = ["kernel" if devices[d] else "reference" for d in ("cpu", "cuda")]
        lines.append(f"  {op:30s} {cells[0]:10s} {cells[1]}")
    lines += ["", "registered ops: " + ", ".join(info["registered_ops"])]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m kforcing_ops.info",
        description="Print how kforcing_ops was built (torch/CUDA/Python versions, CPU ISA, CUDA archs), "
                    "which ops have CPU and CUDA kernels, and what is running now.")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))


if __name__ == "__main__":
    sys.exit(main())
