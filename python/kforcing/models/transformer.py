"""The Transformer every model here is built on, the AR teacher, and the static KV cache of decoding.

Backbone (docs/method.md §2): token embedding -> n_layer x [pre-LayerNorm attention with rotary position
embeddings, pre-LayerNorm GELU MLP] -> final LayerNorm -> LM head. Untied input/output embeddings, no biases,
grouped-query attention when n_kv_head < n_head. Rotary positions are passed explicitly with every row, so a
hint row can carry the position of the token it predicts.

    ModelConfig      sizes and presets (`PRESETS`).
    Transformer      the shared backbone; the push-forward student (`kforcing.students.push_forward.model`)
                     adds its noise embedding to it.
    ARModel          the teacher: `forward(ids)` -> logits for training, `decode(...)` over a static KV cache.
    KVCache          the decode cache: real tokens only, per-sequence lengths.

Attention goes through the public `kforcing_ops` functions (C++/CUDA kernels, falling back to the pure-PyTorch
references where a kernel is missing); `with kforcing_ops.use_reference():` runs the references instead, for every
op at once.
"""

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import kforcing_ops
from kforcing_ops.nn import DecodeLinear

# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class ModelConfig:
    """Hyper-parameters of the backbone (shared by teacher and student).

    Attributes:
        vocab_size: V, tokens in the vocabulary (the tokenizer's size when training with `kforcing.training.train`).
        n_layer: Transformer blocks.
        n_embd: width H.
        n_head: query heads; head_dim = n_embd // n_head, and must be even (rotary embeddings).
        n_kv_head: key/value heads (grouped-query attention); must divide n_head.
        max_seq_len: the longest sequence the model is trained/decoded on (context + generated tokens).
        rope_base: base of the rotary frequencies, base^(-2j/head_dim).
        dropout: residual dropout in training (attention probabilities are not dropped: the fused attention
            kernels have no dropout).
        mlp_ratio: the MLP's hidden width is mlp_ratio * n_embd.
    """

    vocab_size: int = 2048
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    max_seq_len: int = 256
    rope_base: float = 10000.0
    dropout: float = 0.0
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "max_seq_len", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim = n_embd / n_head = {self.head_dim} must be even (rotary)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"ModelConfig: n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.rope_base > 1.0:
            raise ValueError(f"ModelConfig.rope_base must be > 1, got {self.rope_base}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name, **overrides):
        """A named preset ("tiny", "small", "base"), with any field overridden, e.g. vocab_size=tokenizer size."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Inverse of `to_dict`; unknown keys are an error (a checkpoint from a newer or other format)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}, from a newer kforcing or another format "
                             f"(this kforcing knows {sorted(known)})")
        return cls(**data)

    def num_params(self, max_k=None):
        """Parameter count of ARModel (max_k None) or PushForwardLM (any max_k; the noise encoder is added)."""
        h, d = self.n_embd, self.head_dim
        attn = h * (self.n_head + 2 * self.n_kv_head) * d + self.n_head * d * h
        mlp = 2 * h * self.mlp_ratio * h
        total = 2 * self.vocab_size * h + self.n_layer * (attn + mlp + 2 * h) + h
        if max_k is not None:
            f = max(1, h // 2)
            total += h * 4 * f + h + 2 * h + 2 * h * 4 * h + 4 * h + h
        return total


PRESETS = {
    # ~0.9M parameters: trains on CPU in minutes (tests, CI, the README walk-through).
    "tiny": dict(vocab_size=2048, n_layer=2, n_embd=128, n_head=4, n_kv_head=2, max_seq_len=256),
    # ~26M parameters.
    "small": dict(vocab_size=8192, n_layer=6, n_embd=512, n_head=8, n_kv_head=4, max_seq_len=1024),
    # The paper's backbone: 12 layers x 768 wide x 12 heads (~135M parameters with a 32k vocabulary).
    "base": dict(vocab_size=32768, n_layer=12, n_embd=768, n_head=12, n_kv_head=12, max_seq_len=1024),
}


# ---------------------------------------------------------------------------------------------------------
# Linear layers: kforcing_ops.nn.DecodeLinear, torch's GEMM for training and decode_linear for decode passes

def cast_linear_weights(module, dtype):
    """Store the weights of every `DecodeLinear` in `module` as `dtype` (e.g. torch.bfloat16: half the bytes a
    decode step reads), leaving embeddings, norms, activations and the KV cache as they are. For decoding: the
    model computes with the rounded weights from then on (a bf16 teacher, which verified decoding then matches
    exactly). Returns module."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"linear weights can be stored as float32 or bfloat16, got {dtype}")
    for layer in module.modules():
        if isinstance(layer, DecodeLinear):
            layer.weight.data = layer.weight.data.to(dtype)
    return module


# ---------------------------------------------------------------------------------------------------------
# Building blocks


def rotary_inv_freq(head_dim, rope_base, device=None):
    """Rotary frequencies rope_base^(-2i / head_dim), i < head_dim / 2: computed in float64, kept in float32."""
    return (rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float().to(device)


class KeepsRotaryFloat32:
    """For a module with a rotary buffer `inv_freq` made from `self._rotary` = (head_dim, rope_base): `.to(dtype)`,
    `.bfloat16()` and `.half()` cast every floating buffer, but frequencies rounded to bf16 keep three significant
    digits and the angle at position p is off by p times that error, so after any move or cast the buffer is made
    again in float32 where it now lives (the angles are computed in float32 whatever the weights' dtype)."""

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self.inv_freq = rotary_inv_freq(*self._rotary, device=self.inv_freq.device)
        return module


def rotary_cos_sin(positions, inv_freq):
    """cos/sin of the rotary angles: positions (S,) or (B, S) int -> two (1 or B, S, 1, head_dim/2) float32."""
    if positions.dim() == 1:
        positions = positions[None]
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate (B, S, heads, D) by the angles (half-split convention: pairs (j, j + D/2)), in float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head (grouped-query) self-attention with rotary embeddings; the mask is chosen by `attend`."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.wqkv = DecodeLinear(config.n_embd, qkv, bias=False)
        self.wo = DecodeLinear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos, sin, attend):
        q, k, v = self.wqkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = apply_rotary(rearrange(q, "b s (h d) -> b s h d", d=self.head_dim), cos, sin)
        k = apply_rotary(rearrange(k, "b s (h d) -> b s h d", d=self.head_dim), cos, sin)
        v = rearrange(v, "b s (h d) -> b s h d", d=self.head_dim)
        return self.wo(rearrange(attend(q, k, v), "b s h d -> b s (h d)"))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = DecodeLinear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.proj = DecodeLinear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """x + Attention(LN(x)), then x + MLP(LN(x)); residual dropout on both branches."""

    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attend):
        x = x + self.dropout(self.attn(self.norm1(x), cos, sin, attend))
        return x + self.dropout(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------------------
# The KV cache of decoding


class KVCache:
    """A static, preallocated KV cache shared by the AR and K-Forcing loops.

    Attributes:
        k, v: per layer, (B, L_max, H_kv, D) tensors (views into one allocation), written in place by
            `kforcing_ops.window_attention_decode`.
        seqlens: (B,) int32, the number of valid rows of each sequence (ragged batches). Only real (committed)
            tokens are ever written; rows at or beyond seqlens[b] are never read.
    """

    def __init__(self, num_layers, batch_size, max_len, num_kv_heads, head_dim, device=None, dtype=torch.float32):
        if min(num_layers, batch_size, max_len, num_kv_heads, head_dim) < 1:
            raise ValueError("KVCache: every dimension must be >= 1, got "
                             f"layers={num_layers} batch={batch_size} max_len={max_len} "
                             f"kv_heads={num_kv_heads} head_dim={head_dim}")
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        self._k = torch.zeros(shape, device=device, dtype=dtype)
        self._v = torch.zeros(shape, device=device, dtype=dtype)
        self.k = list(self._k.unbind(0))
        self.v = list(self._v.unbind(0))
        self.seqlens = torch.zeros(batch_size, device=device, dtype=torch.int32)

    @classmethod
    def for_model(cls, model: "Transformer", batch_size, max_len, dtype=None):
        """A cache sized for `model` (its layers, kv heads, head_dim, device and parameter dtype)."""
        config = model.config
        return cls(config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim,
                   device=model.device, dtype=dtype or model.dtype)

    @property
    def num_layers(self):
        return self._k.shape[0]

    @property
    def batch_size(self):
        return self._k.shape[1]

    @property
    def max_len(self):
        return self._k.shape[2]

    def reset(self):
        """Empty every sequence (lengths to 0; the rows are left as they are, and never read)."""
        self.seqlens.zero_()

    def nbytes(self):
        return 2 * self._k.numel() * self._k.element_size()



# ---------------------------------------------------------------------------------------------------------
# The shared backbone


def run_blocks(blocks, x, positions, inv_freq, attend):
    """x (B, S, H) through `blocks` at rotary `positions`; attend(layer, q, k, v) computes each layer's attention."""
    cos, sin = rotary_cos_sin(positions, inv_freq)
    for layer, block in enumerate(blocks):
        x = block(x, cos, sin, functools.partial(attend, layer))
    return x


def decode_pass(run_layers, num_layers, x, cache: KVCache, n_commit):
    """One decode pass of x (B, T, H) against `cache`; advances its lengths by n_commit.

    run_layers(x, positions, attend) runs the model's `num_layers` layers, calling attend(layer, q, k, v) for each
    layer's attention (a kforcing stack of blocks, or a Hugging Face model through `kforcing.teachers.hf_attention`).
    Row j of sequence b sits at position cache.seqlens[b] + j. The first n_commit rows are real tokens and are
    appended to the cache; the others (hints) are used in this pass only (docs/method.md §3).
    """
    batch, rows = x.shape[:2]
    if cache.batch_size != batch:
        raise ValueError(f"the KV cache holds {cache.batch_size} sequences but the step has {batch}")
    if cache.num_layers != num_layers:
        raise ValueError(f"the KV cache has {cache.num_layers} layers but the model has {num_layers}")
    positions = cache.seqlens.to(torch.int64)[:, None] + torch.arange(rows, device=x.device)

    def attend(layer, q, k, v):
        return kforcing_ops.window_attention_decode(q, k, v, cache.k[layer], cache.v[layer], cache.seqlens,
                                                    n_commit)

    hidden = run_layers(x, positions, attend)
    if n_commit:
        cache.seqlens.add_(n_commit)
    return hidden


def decode_logits(head, hidden, logits):
    """What a teacher's `decode` returns for its pass's output rows hidden (B, T, H): head(last row) (B, V) for
    logits="last", head(every row) (B, T, V) for "all", None for None (a prefill that needs no LM head)."""
    if logits is None:
        return None
    if logits == "last":
        return head(hidden[:, -1])
    if logits == "all":
        return head(hidden)
    raise ValueError(f"`logits` must be 'last', 'all' or None, got {logits!r}")


def decode_blocks(blocks, x, cache: KVCache, n_commit, inv_freq):
    """`decode_pass` through a stack of kforcing `blocks` with rotary frequencies inv_freq."""
    return decode_pass(lambda h, positions, attend: run_blocks(blocks, h, positions, inv_freq, attend), len(blocks),
                       x, cache, n_commit)


class Transformer(KeepsRotaryFloat32, nn.Module):
    """The backbone shared by `ARModel` and `PushForwardLM` (not used on its own)."""

    model_type = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"expected a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd, bias=False)
        self.lm_head = DecodeLinear(config.n_embd, config.vocab_size, bias=False)
        self._rotary = (config.head_dim, config.rope_base)
        self.register_buffer("inv_freq", rotary_inv_freq(*self._rotary), persistent=False)
        self._init_weights()

    def _init_weights(self):
        """GPT-2 style: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.wo, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        """The dtype of activations and of the KV cache: the embeddings' (linear weights may be stored in bf16
        alone, `cast_linear_weights`)."""
        return self.tok_emb.weight.dtype

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _check_ids(self, ids, name="ids"):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"`{name}` must be a (batch, seq) tensor of token ids, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"`{name}` must be int64 or int32 token ids, got {ids.dtype}")

    def _run(self, x, positions, attend):
        """The blocks and final norm over input vectors x (B, S, H) at `positions`; attend(layer, q, k, v)."""
        return self.norm(run_blocks(self.blocks, x, positions, self.inv_freq, attend))

    def _decode_run(self, x, cache, n_commit):
        """One decode pass of x (B, T, H) through the blocks and final norm against `cache`; advances the cache."""
        return self.norm(decode_blocks(self.blocks, x, cache, n_commit, self.inv_freq))

    def export_config(self):
        """The JSON-serialisable description from which `build_model` rebuilds this model (checkpoints)."""
        return {"model_type": self.model_type, "model": self.config.to_dict()}


# ---------------------------------------------------------------------------------------------------------
# The AR teacher


class ARModel(Transformer):
    """A causal Transformer LM: the K-Forcing teacher.

    forward(ids) -> logits (B, S, V): training / scoring, causal attention through `window_attention` with no
        windows (the staircase mask with num_windows = 0 is plain causal attention).
    decode(ids, cache, ...) -> logits: one step against a static KV cache (`kforcing.decoding.generate`).
    """

    model_type = "ar"

    # -- the teacher protocol (`kforcing.teachers.protocol`): what the draft student, decoding and evaluation call

    def embed(self, ids):
        """Input vectors (B, S, H) of token ids (B, S)."""
        return self.tok_emb(ids)

    def run_layers(self, x, positions, attend):
        """Every block over input vectors x (B, S, H) at rotary `positions`: the features before the final norm;
        attend(layer, q, k, v) computes each layer's attention in (B, S, heads, D)."""
        return run_blocks(self.blocks, x, positions, self.inv_freq, attend)

    def logits(self, hidden):
        """Next-token logits of `run_layers`' output: the final norm, then the LM head."""
        return self.lm_head(self.norm(hidden))

    def output_layers(self):
        """(norm, lm_head): logits(hidden) = lm_head(norm(hidden))."""
        return self.norm, self.lm_head

    def fingerprint_config(self) -> dict:
        """What `teacher_fingerprint` hashes besides the weights."""
        return self.config.to_dict()

    def forward(self, ids, positions=None):
        """Logits (B, S, V) of the next token at every position of ids (B, S); positions default to 0..S-1."""
        self._check_ids(ids)
        seq = ids.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens is longer than max_seq_len={self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(seq, device=ids.device)
        hidden = self._run(self.tok_emb(ids), positions,
                           lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, 0, 1))
        return self.lm_head(hidden)

    @torch.no_grad()
    def decode(self, ids, cache, n_commit=None, logits="last"):
        """Append ids (B, T) to the cache and return next-token logits.

        Args:
            ids: (B, T) tokens at positions cache.seqlens[b] + 0..T-1.
            cache: a `KVCache`; its lengths advance by n_commit.
            n_commit: rows to write to the cache (default all T).
            logits: "last" -> (B, V) of the last row, "all" -> (B, T, V), None -> no LM head (prefill only).
        """
        self._check_ids(ids)
        n_commit = ids.shape[1] if n_commit is None else n_commit
        return decode_logits(self.lm_head, self._decode_run(self.tok_emb(ids), cache, n_commit), logits)


__all__ = ["ARModel", "KVCache", "KeepsRotaryFloat32", "ModelConfig", "PRESETS", "Transformer", "cast_linear_weights",
           "decode_blocks", "decode_logits", "decode_pass", "rotary_inv_freq", "run_blocks"]
