"""kforcing: K-Forcing (push-forward, joint next-k-token decoding) on top of kforcing_ops.

Modules:
    kforcing.model       ModelConfig (presets tiny / small / base), ARModel (teacher), PushForwardLM (student)
    kforcing.generate    KVCache, generate_ar, generate_kforcing: static-cache decoding with coupled noise
    kforcing.noise       counter_uniform: uniforms as a pure function of (seed, sequence, position)
    kforcing.data        corpora (the stdlib default corpus, files, JSONL, Hugging Face), BPE tokenizers, token caches
    kforcing.train       TrainConfig, train_teacher: AdamW, exact resume, DDP
    kforcing.checkpoint  save_checkpoint / load_model: safetensors + JSON config + tokenizer, atomic
    kforcing.distill     DistillConfig, distill: progressive self-forcing distillation AR -> k=1 -> 2 -> 4
    kforcing.evaluate    EvalConfig, run_eval: coupled agreement, sample quality, decode speed; report + plots
    kforcing.demo        run_demo: corpus -> teacher -> distillation -> evaluation -> report (`kforcing demo`)
    kforcing.cli         the `kforcing` command (train-teacher, sample, distill, eval, demo)
"""

from .generate import GenerationOutput, KVCache, generate_ar, generate_kforcing
from .model import ARModel, ModelConfig, PushForwardLM, ops_backend, set_ops_backend
from .noise import counter_uniform

__all__ = [
    "ARModel", "GenerationOutput", "KVCache", "ModelConfig", "PushForwardLM", "counter_uniform", "generate_ar",
    "generate_kforcing", "ops_backend", "set_ops_backend",
]
