"""The models: the Transformer backbone, the AR teacher (`ARModel`), presets and the static KV cache.

    transformer   ModelConfig, PRESETS, Transformer, ARModel, KVCache and the block/decode-pass helpers that the
                  students and Hugging Face teachers reuse

Imports only kforcing_ops and the foundations (`kforcing.runtime`, `kforcing.noise`, `kforcing.data`).
"""
