"""kforcing: K-Forcing (push-forward, joint next-k-token decoding) on top of kforcing_ops.

Packages by concern, each importing only the ones below it (tests/test_imports.py checks the order):

    kforcing.cli           the `kforcing` command and the demo
    kforcing.training      the training loop, teacher training, distillation stages and their targets
    kforcing.evaluation    metrics, `kforcing eval`, reports and plots
    kforcing.checkpoints   the checkpoint format, run folders, provenance, loading any model by its path
    kforcing.decoding      AR, push-forward and draft decoding, adaptive drafting, speculative sampling
    kforcing.students      the push-forward student and the draft student with its heads and adapters
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
from .students.push_forward import PushForwardLM

__all__ = ["ARModel", "GenerationOutput", "KVCache", "ModelConfig", "PushForwardLM", "counter_uniform", "generate_ar",
           "generate_kforcing"]
