"""kforcing: K-Forcing (push-forward, joint next-k-token decoding) on top of kforcing_ops.

The stages, in the order data flows through them (each reads the previous one's run directory through
`kforcing.checkpoint`):

    kforcing.data        corpora, BPE tokenizers, token caches, held-out contexts
    kforcing.train       the teacher's config, batches and loss (`kforcing train-teacher`)
    kforcing.targets     distillation targets, training noise and the window loss
    kforcing.distill     the stage schedule AR -> k=1 -> 2 -> 4 (`kforcing distill`)
    kforcing.evaluate    coupled agreement, sample quality, decode speed -> results (`kforcing eval`)
    kforcing.report      every Markdown table and plot, from results
    kforcing.demo        the whole pipeline with profiles (`kforcing demo`)

and what they share:

    kforcing.model       ModelConfig, ARModel (teacher), PushForwardLM (student), KVCache
    kforcing.teacher     the teacher protocol that ARModel and kforcing.hf_teacher.HFTeacher (a Hugging Face causal
                         LM, `--teacher hf:PATH`) implement
    kforcing.generate    generate_ar, generate_kforcing: static-cache decoding with coupled noise
    kforcing.noise       counter_uniform: uniforms as a pure function of (seed, sequence, position)
    kforcing.checkpoint  checkpoints (checksummed, atomic), run-directory layout, typed provenance
    kforcing.loading     load_model: any model by its path (a checkpoint or run, a draft student with its teacher,
                         or a Hugging Face model "hf:PATH")
    kforcing.trainer     the one training loop (accumulation, DDP, autocast, clipping, EMA, logging, exact resume)
    kforcing.metrics     pure metrics: agreement, perplexity, text statistics, decode speed
    kforcing.options     config fields that define their command-line flags (one default, one help text)
    kforcing.runtime     device resolution, atomic writes, checksums, git commit
    kforcing.cli         the `kforcing` command (argparse only)
"""

from .generate import GenerationOutput, generate_ar, generate_kforcing
from .model import ARModel, KVCache, ModelConfig, PushForwardLM
from .noise import counter_uniform

__all__ = ["ARModel", "GenerationOutput", "KVCache", "ModelConfig", "PushForwardLM", "counter_uniform", "generate_ar",
           "generate_kforcing"]
