"""A Hugging Face causal LM as a kforcing teacher: `HFTeacher` and `load_hf_teacher("hf:PATH")`.

The model stays a transformers model (frozen; its weights are never copied into kforcing checkpoints). `HFTeacher`
implements the teacher protocol of `kforcing.teachers.protocol`:

    embed(ids)                         the model's input embedding
    run_layers(x, positions, attend)   the model's decoder over input vectors x (`inputs_embeds`) at per-row
                                       `position_ids`, every attention computed by attend(layer, q, k, v) through
                                       attn_implementation="kforcing" (`kforcing.teachers.hf_attention`); ends with the
                                       model's final norm
    logits(hidden)                     the model's LM head

so hint rows (noise embeddings entering through inputs_embeds, at the position of the token they predict), the
staircase masks of training and kforcing's static `KVCache` of decoding all work as for kforcing's own `ARModel`.

Supported families (`FAMILIES`): Llama and the models built like it (Qwen2, Mistral: RoPE, grouped-query attention)
and GPT-2 (learned absolute positions). Their layers are named here so that the trunk adapters of
`kforcing.students.draft.hf_adapters` can wrap the model's own linear layers; another architecture is a clear error
naming these. transformers is an optional dependency (the extra `hf`), imported only when a model is loaded.
"""

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import kforcing_ops
from kforcing_ops.nn import DecodeLinear

from ..models.transformer import KVCache, decode_logits, decode_pass
from .hf_attention import ATTEND_KWARG, ATTENTION_NAME, register_attention

HF_PREFIX = "hf:"
INSTALL_HINT = 'pip install --no-build-isolation -e ".[hf]" in the repository, or pip install "transformers>=5.24,<6"'


class HFTeacherError(ValueError):
    """A Hugging Face model that cannot be a kforcing teacher (or cannot be loaded), with what to do."""


class TransformersMissing(HFTeacherError, ImportError):
    """transformers is not installed (an ImportError, and an HFTeacherError for the command line's error line)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a model family keeps what kforcing needs, as attribute paths from the base model (`model.base_model`).

    Attributes:
        layers: the decoder layers (a ModuleList).
        final_norm: the norm after the last layer.
        linears: per layer, the linear layers the trunk adapters wrap (attention and MLP projections).
        fused_qkv: the one of `linears` that projects q, k and v at once (it gets one adapter per q, k and v),
            or None.
    """

    layers: str
    final_norm: str
    linears: Tuple[str, ...]
    fused_qkv: Optional[str] = None


_LLAMA = Family("layers", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
FAMILIES: Dict[str, Family] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    # GPT-2's projections are transformers' Conv1D (a Linear with a transposed weight): the adapters read only
    # their inputs and outputs, so the layout does not matter.
    "gpt2": Family("h", "ln_f", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), fused_qkv="attn.c_attn"),
}

# Keys of a transformers config that do not change what the model computes (left out of the fingerprint).
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "name_or_path", "architectures",
                         "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


def require_transformers():
    """The transformers module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise TransformersMissing(f"Hugging Face teachers need the `transformers` package: {INSTALL_HINT}") from None
    return transformers


def is_hf_spec(spec) -> bool:
    """Whether a teacher/checkpoint argument names a Hugging Face model ("hf:PATH_OR_HUB_NAME")."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def check_supported(hf_config):
    """Raise HFTeacherError unless kforcing can run this transformers config as a teacher."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise HFTeacherError(f"model_type {model_type!r} is not supported as a kforcing teacher: supported are "
                             f"{sorted(FAMILIES)} (kforcing must know where the family keeps its decoder layers, "
                             "final norm and linear layers)")
    if model_type == "gpt2":
        if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
            raise HFTeacherError("GPT-2 with scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True is not "
                                 "supported: kforcing's attention scales scores by 1/sqrt(head_dim)")
        if hf_config.add_cross_attention:
            raise HFTeacherError("GPT-2 with cross-attention (add_cross_attention=True) is not a causal LM teacher")


@dataclasses.dataclass(frozen=True)
class HFModelConfig:
    """The shape of a Hugging Face teacher, in the names kforcing's code reads (as
    `kforcing.models.transformer.ModelConfig`).

    max_seq_len is the model's max_position_embeddings, or its sliding window when that is shorter: kforcing's
    attention is full-causal, which equals the model's own only while no sequence is longer than its window.
    """

    model_type: str
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    max_seq_len: int

    @classmethod
    def from_model(cls, model) -> "HFModelConfig":
        config = model.config
        n_head = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        max_len = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window:
            max_len = min(max_len, window)
        return cls(config.model_type, model.get_input_embeddings().num_embeddings, config.num_hidden_layers,
                   config.hidden_size, n_head, getattr(config, "num_key_value_heads", None) or n_head, head_dim,
                   max_len)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class HFTeacher(nn.Module):
    """A transformers causal LM behind kforcing's teacher protocol (see the module docstring).

    Attributes:
        model: the transformers model (`...ForCausalLM`), run with attn_implementation="kforcing".
        config: its `HFModelConfig`.
        source: "hf:PATH" (or "hf:HUB_NAME") it was loaded from, recorded in the provenance of students; None
            for a model built in memory.
    """

    def __init__(self, model, source: Optional[str] = None):
        super().__init__()
        check_supported(model.config)
        register_attention()
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        self.model, self.source = model, source
        self.family = FAMILIES[model.config.model_type]
        self.config = HFModelConfig.from_model(model)

    @property
    def device(self):
        return self.model.get_output_embeddings().weight.device

    @property
    def dtype(self):
        return self.model.get_output_embeddings().weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- the teacher protocol ----------------------------------------------------------------------------------

    def embed(self, ids):
        """Input vectors (B, S, H) of token ids (B, S): the model's input embedding (positions are added inside the
        model, for GPT-2)."""
        return self.model.get_input_embeddings()(ids)

    def run_layers(self, x, positions, attend):
        """The decoder and its final norm over input vectors x (B, S, H) at `positions` ((S,) or (B, S)), every
        attention computed by attend(layer, q, k, v) in kforcing's layout (B, S, heads, D)."""
        if positions.dim() == 1:
            positions = positions[None]
        positions = positions.expand(x.shape[0], -1)
        out = self.model.base_model(inputs_embeds=x, position_ids=positions, use_cache=False,
                                    **{ATTEND_KWARG: attend})
        return out.last_hidden_state

    def logits(self, hidden):
        """Next-token logits of `run_layers`' output (already normed): the LM head."""
        return self.model.get_output_embeddings()(hidden)

    def output_layers(self):
        """(norm, lm_head): logits(hidden) = lm_head(norm(hidden)); the norm is run_layers' own, so an identity."""
        return nn.Identity(), self.model.get_output_embeddings()

    def fingerprint_config(self) -> dict:
        """What `teacher_fingerprint` hashes besides the weights: the shape and the model's whole config."""
        settings = {key: value for key, value in self.model.config.to_dict().items()
                    if key not in _VOLATILE_CONFIG_KEYS and not key.startswith("_")}
        return {**self.config.to_dict(), "hf_config": json.dumps(settings, sort_keys=True, default=str)}

    def forward(self, ids, positions=None):
        """Logits (B, S, V) of the next token at every position of ids (B, S), causal attention through kforcing."""
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than max_seq_len={self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.run_layers(self.embed(ids), positions,
                                 lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, 0, 1))
        return self.logits(hidden)

    @torch.no_grad()
    def decode(self, ids, cache: KVCache, n_commit=None, logits="last"):
        """Append ids (B, T) to the cache and return next-token logits, as
        `kforcing.models.transformer.ARModel.decode`."""
        n_commit = ids.shape[1] if n_commit is None else n_commit
        hidden = decode_pass(self.run_layers, self.config.n_layer, self.embed(ids), cache, n_commit)
        return decode_logits(self.logits, hidden, logits)

    # -- what the trunk adapters wrap --------------------------------------------------------------------------

    def final_norm(self) -> nn.Module:
        return self.model.base_model.get_submodule(self.family.final_norm)

    def adapted_linears(self) -> List[Dict[str, nn.Module]]:
        """Per decoder layer, {attribute path: module} of the linear layers the trunk adapters wrap."""
        layers = self.model.base_model.get_submodule(self.family.layers)
        return [{name: layer.get_submodule(name) for name in self.family.linears} for layer in layers]


def linear_features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight stored as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    raise HFTeacherError(f"cannot adapt a {type(module).__name__}: expected an nn.Linear or a Conv1D")


def _local_tokenizer(directory: Path):
    from ..data import load_tokenizer

    return load_tokenizer(directory) if (directory / "tokenizer.json").is_file() else None


def check_tokenizer(teacher: HFTeacher, tokenizer, name: str):
    """A tokenizer with more ids than the model's embedding has rows belongs to another model: a clear error. (A
    model may have more rows than its tokenizer has ids: vocabularies are often padded.)"""
    if tokenizer is not None and tokenizer.vocab_size > teacher.config.vocab_size:
        raise HFTeacherError(f"the tokenizer of {name} has {tokenizer.vocab_size} tokens but the model's embedding "
                             f"only {teacher.config.vocab_size}: the tokenizer belongs to another model")


@contextlib.contextmanager
def _quiet_loading(transformers):
    """transformers' "Loading weights" bar off while a teacher loads: kforcing's commands draw their own progress
    (and --no-progress must mean none)."""
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def use_decode_linear(model: nn.Module) -> int:
    """Turn every plain nn.Linear of `model` into a `kforcing_ops.nn.DecodeLinear`, in place; returns how many.

    The modules keep their parameters, state dict and training behaviour (DecodeLinear adds no state: it is an
    nn.Linear whose no-grad calls of at most 64 rows run kforcing_ops.decode_linear), so fingerprints and adapters
    are unaffected. GPT-2's Conv1D layers are not nn.Linear and keep torch's GEMM.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
            count += 1
    return count


def load_hf_teacher(spec: str, device="cpu", dtype: Optional[torch.dtype] = None, with_tokenizer: bool = True,
                    decode_linear: bool = True):
    """(HFTeacher in eval mode, its tokenizer or None) from "hf:PATH" (a save_pretrained directory) or "hf:NAME" (a
    hub model, when the hub is reachable). dtype: the parameter dtype (default float32). decode_linear: the model's
    nn.Linear layers become `kforcing_ops.nn.DecodeLinear` (`use_decode_linear`), so decode passes stream each
    weight once and are row-invariant as kforcing's own teachers are."""
    name = spec[len(HF_PREFIX):] if is_hf_spec(spec) else str(spec)
    if not name:
        raise HFTeacherError(f"{spec!r} names no model: write hf:PATH (a directory saved with save_pretrained)")
    transformers = require_transformers()
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise HFTeacherError(f"{HF_PREFIX}{name}: {local} has no config.json (save the model with "
                                 "save_pretrained)")
        source = str(local.resolve())
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise HFTeacherError(f"{HF_PREFIX}{name}: no such directory")
    else:
        source = name
    try:
        hf_config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise HFTeacherError(f"cannot load the Hugging Face model {name!r}: it is not a local directory and the hub "
                             f"did not provide it ({type(error).__name__}: {error}). Pass hf:PATH, a directory "
                             "saved with save_pretrained.") from None
    check_supported(hf_config)
    register_attention()
    with _quiet_loading(transformers):
        model = transformers.AutoModelForCausalLM.from_pretrained(source, config=hf_config,
                                                                  attn_implementation=ATTENTION_NAME,
                                                                  dtype=dtype or torch.float32)
    if decode_linear:
        use_decode_linear(model)
    teacher = HFTeacher(model, source=HF_PREFIX + source).to(device).eval()
    tokenizer = None
    if with_tokenizer:
        if local.exists():
            tokenizer = _local_tokenizer(local)
        else:
            from ..data import TokenizerError, load_tokenizer
            try:
                tokenizer = load_tokenizer(source)
            except TokenizerError:
                tokenizer = None
        check_tokenizer(teacher, tokenizer, spec)
    return teacher, tokenizer


__all__ = ["FAMILIES", "HFModelConfig", "HFTeacher", "HFTeacherError", "HF_PREFIX", "TransformersMissing",
           "check_supported", "check_tokenizer", "is_hf_spec", "linear_features", "load_hf_teacher",
           "require_transformers"]
