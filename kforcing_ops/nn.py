"""Drop-in nn.Modules built on the kforcing ops."""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .attention import window_attention, window_attention_decode
from .embedding import noise_conditioned_embedding, noise_embedding
from .linear import decode_linear

# No-grad calls of a DecodeLinear with at most this many rows run decode_linear; larger ones (long prefills,
# scoring whole sequences) run torch's GEMM, which is faster there (bench/results/linear_cpu), unless a decoder has
# asked for row invariance (`row_invariant_linears`).
DECODE_LINEAR_MAX_ROWS = 64
_decode_linear_enabled = True
_row_invariant = False


@contextlib.contextmanager
def torch_linears():
    """Inside this block every `DecodeLinear` runs torch's GEMM, decode passes included: the "before" of
    benchmarks, and a way to rule the kernel out when debugging. A module-level switch (not thread-safe)."""
    global _decode_linear_enabled
    previous, _decode_linear_enabled = _decode_linear_enabled, False
    try:
        yield
    finally:
        _decode_linear_enabled = previous


@contextlib.contextmanager
def row_invariant_linears():
    """Inside this block every no-grad `DecodeLinear` call runs the kernel whatever its row count, so that a row's
    output has the same bits whatever rows share its call, past DECODE_LINEAR_MAX_ROWS too.

    Decoders run their passes after the prefill inside it: a verify pass of B x k rows must give each row the bits
    of the B-row AR step it stands for (torch's GEMM gives a row other bits in calls of other sizes), whatever the
    batch. The price is speed past a few dozen rows, where torch's GEMM is faster than the kernel
    (bench/results/linear_cpu: 1.3x at 128 rows in fp32 on a CPU). `torch_linears()` still wins over it. A
    module-level switch (not thread-safe)."""
    global _row_invariant
    previous, _row_invariant = _row_invariant, True
    try:
        yield
    finally:
        _row_invariant = previous


def linear_mode() -> str:
    """Which path `DecodeLinear`'s decode calls take here: "torch" (inside `torch_linears()`), "row-invariant"
    (inside `row_invariant_linears()`) or "kernel" (up to DECODE_LINEAR_MAX_ROWS rows). A cached CUDA graph of a
    decode step is keyed by it, since a graph replays whichever linear layers it was captured with."""
    return "torch" if not _decode_linear_enabled else "row-invariant" if _row_invariant else "kernel"


class DecodeLinear(nn.Linear):
    """nn.Linear whose decode-time calls run `decode_linear`: a drop-in that makes decode steps read each weight once
    and gives every row the same bits whatever rows share the call.

    No-grad calls with fp32 or bf16 tensors run the kernel on at most DECODE_LINEAR_MAX_ROWS rows, or on any number
    inside `row_invariant_linears()`; everything else (training, scoring long sequences, fp64 or fp16 models) runs
    torch's GEMM. The weight may be stored in bf16 while activations stay fp32: the kernel widens it in registers,
    torch's path casts it to x's dtype first.
    """

    def forward(self, x):
        if (_decode_linear_enabled and not torch.is_grad_enabled()
                and (_row_invariant or math.prod(x.shape[:-1]) <= DECODE_LINEAR_MAX_ROWS)
                and x.dtype in _checks.LINEAR_TYPES and self.weight.dtype in _checks.LINEAR_TYPES):
            return decode_linear(x, self.weight, self.bias)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class NoiseEmbedding(nn.Module):
    """e(u, tau): the input vector of a K-Forcing hint row (docs/method.md §2).

    x = noise_embedding(u, tau, weight, bias)    features of u (by `code`) and tau + Linear, fused
    e = x + MLP(LayerNorm(x))                    a residual GELU MLP

    Args:
        hidden: H, the model width.
        num_freqs: F, frequencies per sinusoid; the Linear maps 4F features to H. Default H // 2 (4F = 2H).
        mlp_ratio: the MLP's hidden width is mlp_ratio * H.
        code: how u is encoded, "sinusoid" (default), "dyadic" or "binary" (see `kforcing_ops.noise_embedding`).

    Init: weight ~ N(0, 0.02) and bias = 0, as a token embedding (features are cos/sin, so the output has the
    scale of an embedding row); the MLP's output layer is zero, so at initialisation e = x and the residual
    MLP starts as the identity.
    """

    def __init__(self, hidden, num_freqs=None, mlp_ratio=4, code="sinusoid", device=None, dtype=None):
        super().__init__()
        _checks.choice(code, _checks.NOISE_CODES, "NoiseEmbedding", "code")
        self.code = code
        self.num_freqs = num_freqs or max(1, hidden // 2)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(hidden, 4 * self.num_freqs, **factory))
        self.bias = nn.Parameter(torch.empty(hidden, **factory))
        self.norm = nn.LayerNorm(hidden, **factory)
        self.mlp = nn.Sequential(
            DecodeLinear(hidden, mlp_ratio * hidden, **factory),
            nn.GELU(),
            DecodeLinear(mlp_ratio * hidden, hidden, **factory),
        )
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def residual(self, x):
        return x + self.mlp(self.norm(x))

    def forward(self, u, tau):
        """u: any shape (...) in [0, 1]; tau: a float or a tensor broadcastable to u. Returns (..., H)."""
        tau = torch.broadcast_to(tau, u.shape).reshape(-1) if isinstance(tau, torch.Tensor) else tau
        x = noise_embedding(u.reshape(-1), tau, self.weight, self.bias, self.code)
        return self.residual(x.view(*u.shape, -1))

    def embed_sequence(self, token_ids, token_table, u, tau):
        """[token_table[token_ids] | e(u, tau)]: (B, Tc + Th, H), a model's whole input sequence."""
        x = noise_conditioned_embedding(token_ids, token_table, u, tau, self.weight, self.bias, self.code)
        contexts = token_ids.shape[1]
        return torch.cat([x[:, :contexts], self.residual(x[:, contexts:])], dim=1)

    def extra_repr(self):
        return f"hidden={self.weight.shape[0]}, num_freqs={self.num_freqs}, code={self.code!r}, init_std=0.02"


class WindowAttention(nn.Module):
    """Multi-head self-attention with K-Forcing's masks: a drop-in for a causal self-attention layer.

    The projections follow nanoGPT's CausalSelfAttention (`c_attn` makes q, k, v; `c_proj` mixes the heads), with
    grouped-query attention when kv_heads < heads.

    forward(x, num_windows=0, window_size=1)
        x: (B, S, hidden) = [N context rows | num_windows windows of window_size hint rows]. With no windows
        this is plain causal attention, so an unchanged model keeps its outputs.
    decode(x, k_cache, v_cache, cache_seqlens, n_commit)
        x: (B, T, hidden) new rows, the first n_commit of them committed tokens: their K/V are appended to the
        caches (B, L_max, kv_heads, head_dim) in place; advance cache_seqlens yourself.

    Dropping it into nanoGPT: `block.attn = WindowAttention.from_causal_self_attention(block.attn)` keeps the
    weights; pass num_windows / window_size down from the model's forward to train K-Forcing windows. Positional
    information is the model's business: nanoGPT adds absolute position embeddings to x; a rotary model applies
    its rotation inside `rotate(q, k)` (override it).
    """

    def __init__(self, hidden, heads, kv_heads=None, bias=True, device=None, dtype=None):
        super().__init__()
        kv_heads = kv_heads or heads
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"WindowAttention: hidden ({hidden}) must be divisible by heads ({heads}), and heads "
                             f"by kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        factory = {"device": device, "dtype": dtype}
        self.c_attn = DecodeLinear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=bias, **factory)
        self.c_proj = DecodeLinear(hidden, hidden, bias=bias, **factory)

    @classmethod
    def from_causal_self_attention(cls, attn):
        """A WindowAttention with the weights of a nanoGPT CausalSelfAttention (c_attn, c_proj, n_head)."""
        hidden = attn.c_attn.in_features
        module = cls(hidden, attn.n_head, bias=attn.c_attn.bias is not None, device=attn.c_attn.weight.device,
                     dtype=attn.c_attn.weight.dtype)
        module.load_state_dict({k: v for k, v in attn.state_dict().items() if k.startswith(("c_attn", "c_proj"))})
        return module

    def rotate(self, q, k):
        """Hook for rotary position embeddings; identity here."""
        return q, k

    def _project(self, x):
        batch, rows, _ = x.shape
        q, k, v = self.c_attn(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, rows, self.heads, self.head_dim)
        k = k.view(batch, rows, self.kv_heads, self.head_dim)
        q, k = self.rotate(q, k)
        return q, k, v.view(batch, rows, self.kv_heads, self.head_dim)

    def forward(self, x, num_windows=0, window_size=1):
        q, k, v = self._project(x)
        out = window_attention(q, k, v, num_windows, window_size)
        return self.c_proj(out.reshape(x.shape))

    def decode(self, x, k_cache, v_cache, cache_seqlens, n_commit):
        q, k, v = self._project(x)
        out = window_attention_decode(q, k, v, k_cache, v_cache, cache_seqlens, n_commit)
        return self.c_proj(out.reshape(x.shape))


__all__ = ["DECODE_LINEAR_MAX_ROWS", "DecodeLinear", "NoiseEmbedding", "WindowAttention", "linear_mode",
           "row_invariant_linears", "torch_linears"]
