"""The trunk pathway of a `DraftStudent`: hint rows through the teacher's own blocks, with row-gated adapters.

In the head pathway (`kforcing.students.draft.student.HintHead`) hint rows run through a few separate blocks stacked on
the teacher's final features. In the trunk pathway they run through every block of the teacher, and each block's weights
are adapted for hint rows only (docs/method.md §8):

    token stream   context rows, committed tokens: the teacher itself (the same call as the teacher's forward or
                   decode pass, so their logits are the teacher's bit for bit). Its per-layer keys and values
                   are what hint rows attend to.
    window rows    the rows of one window: [y1 | hints]. Row 0 (y1, an exact token) is a token row: it runs the
                   teacher's weights. The hint rows run the adapted weights. At layer l every window row attends
                   to the token stream's keys/values of layer l up to its window's anchor, and causally to the
                   window's own rows at layer l (the staircase of §3).

Adapters (`HeadConfig.adapter_rank`):

    r >= 1   a rank-r LoRA on every linear layer of a block: the fused q/k/v projection (one rank-r adapter per
             q, k and v), the attention output projection, and both MLP layers. W x + B A x on hint rows, W x on
             token rows; B starts at zero, so the student starts as the teacher. Layer norms are the teacher's.
    0        "full": a trainable copy of every weight of the block (both layer norms, q/k/v, output projection,
             MLP), initialised from the teacher and used for hint rows only. The default for kforcing's own
             teachers (TrunkAdapters.DEFAULT_RANK); Hugging Face teachers take LoRAs only.

The adapters apply to selected rows only, which is why they are this project's own modules: a generic LoRA
library (peft, which is not a dependency either) adapts a Linear for every row that passes through it, and that
would change the token rows.

`TrunkAdapters` holds every trainable parameter of the pathway (the adapters, the final norm of hint rows and the
noise encoder), so `student.head.parameters()` and `student.head.state_dict()` work as in the head pathway; the
teacher's blocks are passed in at call time and never become part of it.
"""

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kforcing_ops.nn import DecodeLinear, NoiseEmbedding

from ...models.transformer import ModelConfig, apply_rotary, rotary_cos_sin
from .draft_module import DraftModule


def _split_rows(x, n_token):
    """(token rows, hint rows) of x (..., R, H): the first n_token rows along dim -2, then the rest."""
    return x[..., :n_token, :], x[..., n_token:, :]


class GatedLoRALinear(nn.Module):
    """A LoRA adapter of a frozen Linear that applies to hint rows only.

    forward(base, x, n_token): x (..., R, in); the first n_token rows (dim -2) are token rows and get base(x)
    exactly; the others get base(x) + B A x. `out_splits` splits the output features (the fused q/k/v
    projection: [q, k, v]); each split has its own rank-`rank` pair (A_i, B_i). A is initialised as nn.Linear's
    weight (Kaiming uniform), B at zero, so the adapter starts as the identity. No alpha/r scaling (it would only
    rescale the learning rate of B).
    """

    def __init__(self, in_features, out_splits, rank):
        super().__init__()
        self.rank, self.out_splits = rank, [int(o) for o in out_splits]
        self.lora_A = nn.Parameter(torch.empty(len(self.out_splits) * rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(sum(self.out_splits), rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, x):
        """B A x (..., out) for x (..., in)."""
        ax = F.linear(x, self.lora_A).split(self.rank, dim=-1)
        bs = self.lora_B.split(self.out_splits, dim=0)
        return torch.cat([F.linear(a, b) for a, b in zip(ax, bs)], dim=-1)

    def forward(self, base, x, n_token):
        out = base(x)
        if x.shape[-2] <= n_token:
            return out
        token, hint = _split_rows(out, n_token)
        return torch.cat([token, hint + self.delta(x[..., n_token:, :])], dim=-2)

    def extra_repr(self):
        return f"rank={self.rank}, out_splits={self.out_splits}"


class GatedCopy(nn.Module):
    """A full trainable copy of a frozen module (a Linear or a LayerNorm) used for hint rows only.

    forward(base, x, n_token): token rows (the first n_token along dim -2) run `base`, the others `self.copy`.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.copy = module

    def forward(self, base, x, n_token):
        token, hint = _split_rows(x, n_token)
        if hint.shape[-2] == 0:
            return base(x)
        return torch.cat([base(token), self.copy(hint)], dim=-2)


class _Frozen(nn.Module):
    """No adapter: the teacher's module for every row (the layer norms of a LoRA adapter)."""

    def forward(self, base, x, n_token):
        return base(x)


class BlockAdapter(nn.Module):
    """The adapters of one teacher block; forward runs the block over window rows with them.

    forward(block, x, cos, sin, attend, n_token):
        block: the teacher's `Block` (frozen; not stored here).
        x: (B, W, R, H) window rows, the first n_token of each window token rows.
        cos, sin: rotary angles of the flattened rows (B or 1, W*R, 1, D/2).
        attend(q, k, v): the layer's attention over the flattened rows (B, W*R, heads, D) -> same shape.
    """

    def __init__(self, config: ModelConfig, rank: int):
        super().__init__()
        width, head_dim = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, head_dim
        splits = [config.n_head * head_dim, config.n_kv_head * head_dim, config.n_kv_head * head_dim]
        hidden = config.mlp_ratio * width
        if rank == 0:
            self.norm1 = GatedCopy(nn.LayerNorm(width, bias=False))
            self.wqkv = GatedCopy(DecodeLinear(width, sum(splits), bias=False))
            self.wo = GatedCopy(DecodeLinear(config.n_head * head_dim, width, bias=False))
            self.norm2 = GatedCopy(nn.LayerNorm(width, bias=False))
            self.fc = GatedCopy(DecodeLinear(width, hidden, bias=False))
            self.proj = GatedCopy(DecodeLinear(hidden, width, bias=False))
        else:
            self.norm1, self.norm2 = _Frozen(), _Frozen()
            self.wqkv = GatedLoRALinear(width, splits, rank)
            self.wo = GatedLoRALinear(config.n_head * head_dim, [width], rank)
            self.fc = GatedLoRALinear(width, [hidden], rank)
            self.proj = GatedLoRALinear(hidden, [width], rank)
        self.dropout = nn.Dropout(config.dropout)

    @torch.no_grad()
    def copy_from(self, block):
        """Full copies start as the teacher's block (LoRA adapters need nothing: B = 0)."""
        pairs = [(self.norm1, block.norm1), (self.wqkv, block.attn.wqkv), (self.wo, block.attn.wo),
                 (self.norm2, block.norm2), (self.fc, block.mlp.fc), (self.proj, block.mlp.proj)]
        for mine, theirs in pairs:
            if isinstance(mine, GatedCopy):
                mine.copy.load_state_dict(theirs.state_dict())

    def forward(self, block, x, cos, sin, attend, n_token):
        batch, windows, rows, _ = x.shape
        h = self.norm1(block.norm1, x, n_token)
        q, k, v = self.wqkv(block.attn.wqkv, h, n_token).flatten(1, 2).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = apply_rotary(rearrange(q, "b s (h d) -> b s h d", d=self.head_dim), cos, sin)
        k = apply_rotary(rearrange(k, "b s (h d) -> b s h d", d=self.head_dim), cos, sin)
        v = rearrange(v, "b s (h d) -> b s h d", d=self.head_dim)
        out = rearrange(attend(q, k, v), "b (w r) h d -> b w r (h d)", w=windows, r=rows)
        x = x + self._dropout(self.wo(block.attn.wo, out, n_token), n_token)
        h = self.norm2(block.norm2, x, n_token)
        return x + self._dropout(self.proj(block.mlp.proj, F.gelu(self.fc(block.mlp.fc, h, n_token)), n_token),
                                 n_token)

    def _dropout(self, x, n_token):
        """Residual dropout on hint rows only (token rows compute exactly what the teacher in eval mode does)."""
        if not self.training or self.dropout.p == 0.0:
            return x
        token, hint = _split_rows(x, n_token)
        return torch.cat([token, self.dropout(hint)], dim=-2)


class TrunkAdapters(DraftModule):
    """The trainable part of a trunk-pathway `DraftStudent`: per-layer adapters, the final norm of hint rows and
    the noise encoder (see the module docstring).

    Built for a teacher of `model_config`: one `BlockAdapter` per teacher block. `config.adapter_rank` must not
    exceed the model width (a larger rank is no longer low-rank; use 0 for a full copy); None means DEFAULT_RANK,
    and `self.config` records the rank used.
    """

    # A full copy: at the demo's budget it beat rank-8 and rank-32 LoRAs on every acceptance and quality column of
    # the ablation (bench/results/ablation_draft_cpu) at the same wall clock; a kforcing model is small enough to copy.
    DEFAULT_RANK = 0
    # The onepass pathway runs its hint rows in the teacher's own call: with a LoRA every row shares one read of the
    # teacher's weights, where a full copy would read a second set for the hint rows.
    ONE_PASS_RANK = 32

    def __init__(self, model_config: ModelConfig, config):
        super().__init__()
        if config.pathway not in ("trunk", "onepass"):
            raise ValueError(f"TrunkAdapters are the 'trunk' and 'onepass' pathways; this HeadConfig has "
                             f"pathway={config.pathway!r}")
        if config.adapter_rank is None:
            default = self.ONE_PASS_RANK if config.pathway == "onepass" else self.DEFAULT_RANK
            config = dataclasses.replace(config, adapter_rank=min(default, model_config.n_embd))
        rank, width = config.adapter_rank, model_config.n_embd
        if rank > width:
            raise ValueError(f"HeadConfig.adapter_rank={rank} is larger than the model width n_embd={width}: a LoRA "
                             f"rank must be <= {width} (adapter_rank=0 gives a full trainable copy)")
        self.config, self.model_config = config, model_config
        self.teacher_fingerprint = None  # set by DraftStudent: the teacher these weights belong to
        self.layers = nn.ModuleList(BlockAdapter(model_config, rank) for _ in range(model_config.n_layer))
        self.norm = nn.LayerNorm(width, bias=False)
        self.noise = NoiseEmbedding(width, num_freqs=config.noise_num_freqs, code=config.noise_code)

    @classmethod
    def from_teacher(cls, teacher, config):
        """Adapters that start as the teacher: zero LoRA updates, or full copies of its blocks; the final norm of
        hint rows starts as the teacher's."""
        adapters = cls(teacher.config, config).to(device=teacher.device, dtype=teacher.dtype)
        for adapter, block in zip(adapters.layers, teacher.blocks):
            adapter.copy_from(block)
        adapters.norm.load_state_dict(teacher.norm.state_dict())
        return adapters

    def run(self, teacher, x, positions, attend, n_token=1):
        """Window rows x (B, W, R, H) through the teacher's blocks with these adapters (before the final norm).

        positions: rotary positions of the flattened rows, (W*R,) or (B, W*R). attend(layer, q, k, v) computes
        each layer's attention for the flattened window rows (it supplies the token stream's keys and values).
        """
        blocks = teacher.blocks
        if len(blocks) != len(self.layers):
            raise ValueError(f"these adapters are for {len(self.layers)} blocks, the teacher has {len(blocks)}")
        cos, sin = rotary_cos_sin(positions, teacher.inv_freq)
        for layer, (block, adapter) in enumerate(zip(blocks, self.layers)):
            x = adapter(block, x, cos, sin, functools.partial(attend, layer), n_token)
        return x

    def readout(self, teacher, hidden, n_token):
        """Logits of `run`'s output rows (..., R, H): the final norms (`final_norm`), then the teacher's LM head."""
        return teacher.lm_head(self.final_norm(teacher.norm, hidden, n_token))

    def final_norm(self, teacher_norm, x, n_token):
        """The final norm of window rows (..., R, H): the teacher's for token rows, `self.norm` for hint rows."""
        token, hint = _split_rows(x, n_token)
        if token.shape[-2] == 0:
            return self.norm(x)
        if hint.shape[-2] == 0:
            return teacher_norm(x)
        return torch.cat([teacher_norm(token), self.norm(hint)], dim=-2)


__all__ = ["BlockAdapter", "GatedCopy", "GatedLoRALinear", "TrunkAdapters"]
