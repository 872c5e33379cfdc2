"""Checkpoints of push-forward students: every weight, in a `kforcing.checkpoints.checkpoint` directory whose
config.json has model_type "pushforward" and, beside the backbone's ModelConfig, "max_k" and "noise_num_freqs".
"""

from pathlib import Path

from ...checkpoints import checkpoint as ckpt
from ...models.transformer import ModelConfig
from .model import PushForwardLM


def build_push_forward(spec: dict) -> PushForwardLM:
    """An untrained PushForwardLM from `export_config()`'s dict (the config.json of its checkpoint)."""
    if not isinstance(spec, dict) or spec.get("model_type") != "pushforward" or "model" not in spec:
        raise ValueError("a push-forward model spec needs model_type 'pushforward' and a 'model' key")
    if "max_k" not in spec:
        raise ValueError("a 'pushforward' model spec needs 'max_k'")
    return PushForwardLM(ModelConfig.from_dict(spec["model"]), int(spec["max_k"]),
                         noise_num_freqs=spec.get("noise_num_freqs"))


def load_push_forward(path, device="cpu") -> PushForwardLM:
    """The push-forward student of a checkpoint or run directory, in eval mode (without its tokenizer)."""
    directory = ckpt.resolve_checkpoint(path)
    config = ckpt.read_config(Path(directory))
    model, _, _ = ckpt.load_built_model(directory, config, build_push_forward, device, with_tokenizer=False)
    return model


__all__ = ["build_push_forward", "load_push_forward"]
