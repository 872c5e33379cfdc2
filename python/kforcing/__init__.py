"""kforcing: K-Forcing (push-forward, joint next-k-token decoding) on top of kforcing_ops.

Packages by concern, each importing only the ones below it (tests/test_imports.py checks the order):

    kforcing.cli           the `kforcing` command and the demo
    kforcing.serving       vLLM: a draft student exported as its speculative drafter, the plugin, `kforcing serve`
    kforcing.workflows     distill, eval, reports and loading, over any kind of student
    kforcing.students      the Student protocol and its kinds: the push-forward student and the draft student,
                           each with its model, targets, stages, decoding, checkpoints, eval and report rows
    kforcing.training      the training loop, teacher training, the stage loop every student's distillation shares
    kforcing.evaluation    measurements (perplexity, text statistics, agreement, interleaved timing), table helpers
    kforcing.decoding      AR and push-forward decoding over a static cache, request checks
    kforcing.checkpoints   the checkpoint format, run folders, provenance, AR checkpoints
    kforcing.teachers      the teacher protocol; Hugging Face teachers
    kforcing.models        the Transformer, ARModel, presets, KVCache

and the foundations every package may use:

    kforcing.data          corpora, BPE tokenizers, token caches, held-out contexts
    kforcing.noise         counter_uniform: uniforms as a pure function of (seed, sequence, position)
    kforcing.options       config fields that define their command-line flags (one default, one help text)
    kforcing.runtime       device resolution, atomic writes, checksums, run locks, git commit
"""

import importlib

# The public names, imported on first use (PEP 562): `import kforcing.serving.vllm_plugin`, which vLLM runs in each
# of its processes, then loads neither the kernels nor the models.
_PUBLIC = {"GenerationOutput": "decoding.generate", "generate_ar": "decoding.generate",
           "generate_kforcing": "decoding.generate", "ARModel": "models.transformer", "KVCache": "models.transformer",
           "ModelConfig": "models.transformer", "counter_uniform": "noise",
           "PushForwardLM": "students.push_forward.model"}


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kforcing' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])


__all__ = ["ARModel", "GenerationOutput", "KVCache", "ModelConfig", "PushForwardLM", "counter_uniform", "generate_ar",
           "generate_kforcing"]
