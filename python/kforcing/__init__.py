"""kforcing: K-Forcing (push-forward, joint next-k-token decoding) on top of kforcing_ops.

Packages by concern, each importing only the ones below it (tests/test_imports.py checks the order):

    kforcing.cli           the `kforcing` command and the demo
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

from .decoding.generate import GenerationOutput, generate_ar, generate_kforcing
from .models.transformer import ARModel, KVCache, ModelConfig
from .noise import counter_uniform
from .students.push_forward.model import PushForwardLM

__all__ = ["ARModel", "GenerationOutput", "KVCache", "ModelConfig", "PushForwardLM", "counter_uniform", "generate_ar",
           "generate_kforcing"]
