"""A draft student with teacher-exact token rows: the frozen AR teacher plus a light hint head (docs/method.md §8).

Every row that holds a real token (context, committed tokens) runs through the frozen teacher, so its logits are
the teacher's own, bit for bit. Only the head trains. For a window anchored at token position t:

    trunk   the teacher over the tokens 0..t -> final features h_0..h_t (pre final-norm) and exact logits
    y1      token t+1 = inverse_cdf_sample(teacher logits at t, u_1): an exact teacher sample
    head    a few Transformer blocks (initialised from the teacher's last blocks) over
            [h_0..h_t | y1 as a token row | hint rows carrying u_2, u_3, ...]
            ending in the teacher's LM head; its outputs draft tokens 2..k

Row i of a window (0 = the y1 row) sits at position t+1+i and, for i >= 1, carries the uniform of the token at its
own position through a noise embedding e(u, tau). Two readouts turn head outputs into drafts:

    onehot       rows 1..k-1 are hints for u_2..u_k; draft j = argmax of the logits at the row of position j.
    categorical  rows 0..k-2 (y1 and hints for u_2..u_{k-1}) each output a distribution over the NEXT token;
                 draft j = inverse_cdf_sample(that distribution, u_j), so the row that drafts token j never sees
                 u_j, only u_2..u_{j-1}.

A window therefore has k rows (onehot) or k-1 rows (categorical), and the head sees the same staircase as the
student of §3: window rows see the context features up to their anchor and their own window causally.

`DraftStudent` holds the teacher and the head; `kforcing.draft_decode` decodes with it, with or without verification.
"""

import dataclasses
import hashlib
from typing import Optional

import torch
from torch import nn

import kforcing_ops
from kforcing_ops.nn import NoiseEmbedding

from .model import ARModel, Block, ModelConfig, run_blocks

READOUTS = ("onehot", "categorical")


def teacher_fingerprint(teacher: ARModel) -> str:
    """sha256 (first 16 hex digits) of the teacher's config and weights: a head is only valid on this teacher."""
    digest = hashlib.sha256(repr(sorted(teacher.config.to_dict().items())).encode())
    for name, value in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The shape of a hint head.

    Attributes:
        num_layers: Transformer blocks in the head (copied from the teacher's last blocks at initialisation).
        max_k: tokens per window the head is built for: the exact y1 plus max_k - 1 drafts (>= 2).
        readout: "onehot" or "categorical" (see the module docstring).
        noise_num_freqs: F of the noise embedding (default: width // 2).
    """

    num_layers: int = 2
    max_k: int = 4
    readout: str = "onehot"
    noise_num_freqs: Optional[int] = None

    def __post_init__(self):
        for name in ("num_layers", "max_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HeadConfig.{name} must be a positive int, got {value!r}")
        if self.max_k < 2:
            raise ValueError(f"HeadConfig.max_k must be >= 2 (y1 is exact; the head drafts tokens 2..k), "
                             f"got {self.max_k}")
        if self.readout not in READOUTS:
            raise ValueError(f"unknown readout {self.readout!r}; choose one of {READOUTS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadConfig":
        """The inverse of to_dict; an unknown key (a checkpoint from a newer kforcing) is a clear error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown head settings {unknown}: this kforcing knows {sorted(known)}")
        return cls(**data)

    def window_rows(self, k):
        """Rows of one window for k tokens: y1 + k-1 hints (onehot) or y1 + k-2 hints (categorical)."""
        return k if self.readout == "onehot" else k - 1


class HintHead(nn.Module):
    """The trainable part of a `DraftStudent`: blocks, a final norm and the noise encoder of the hint rows."""

    def __init__(self, model_config: ModelConfig, config: HeadConfig):
        super().__init__()
        if config.num_layers > model_config.n_layer:
            raise ValueError(f"a head of {config.num_layers} layers cannot be copied from a teacher of "
                             f"{model_config.n_layer} layers")
        self.config, self.model_config = config, model_config
        self.teacher_fingerprint: Optional[str] = None  # set by DraftStudent: the teacher these weights belong to
        self.blocks = nn.ModuleList(Block(model_config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(model_config.n_embd, bias=False)
        self.noise = NoiseEmbedding(model_config.n_embd, num_freqs=config.noise_num_freqs)

    def export_config(self) -> dict:
        """What a checkpoint's config.json records of the head (`kforcing.checkpoint`): the teacher's model config,
        the head's settings and the fingerprint of the teacher the head was trained on."""
        return {"model_type": "draft", "model": self.model_config.to_dict(), "head": self.config.to_dict(),
                "teacher_fingerprint": self.teacher_fingerprint}

    @classmethod
    def from_teacher(cls, teacher: ARModel, config: HeadConfig):
        """A head whose blocks and final norm start as copies of the teacher's last blocks and final norm."""
        head = cls(teacher.config, config).to(device=teacher.device, dtype=teacher.dtype)
        for mine, theirs in zip(head.blocks, teacher.blocks[-config.num_layers:]):
            mine.load_state_dict(theirs.state_dict())
        head.norm.load_state_dict(teacher.norm.state_dict())
        return head


class DraftStudent:
    """A frozen AR teacher (token rows, exact) and a `HintHead` (hint rows, trained).

    Attributes:
        teacher: the ARModel; its parameters are frozen (requires_grad False) and never saved with the head.
        head: the HintHead; `head.parameters()` is all that trains.
        fingerprint: `teacher_fingerprint(teacher)`, stored in checkpoints and checked when loading.
    """

    def __init__(self, teacher: ARModel, head: HintHead, fingerprint: Optional[str] = None):
        """fingerprint: `teacher_fingerprint(teacher)` when the caller has it already (it hashes every weight)."""
        if not isinstance(teacher, ARModel):
            raise TypeError(f"a DraftStudent needs an ARModel teacher, got {type(teacher).__name__}")
        if head.model_config != teacher.config:
            raise ValueError("the head was built for another model config than the teacher's")
        teacher.requires_grad_(False)
        self.teacher, self.head = teacher, head
        self.fingerprint = fingerprint or teacher_fingerprint(teacher)
        head.teacher_fingerprint = self.fingerprint

    @classmethod
    def from_teacher(cls, teacher: ARModel, config: HeadConfig = HeadConfig()):
        return cls(teacher, HintHead.from_teacher(teacher, config))

    @property
    def config(self) -> ModelConfig:
        return self.teacher.config

    @property
    def head_config(self) -> HeadConfig:
        return self.head.config

    @property
    def max_k(self) -> int:
        return self.head.config.max_k

    @property
    def device(self):
        return self.teacher.device

    def eval(self):
        self.teacher.eval()
        self.head.eval()
        return self

    def to(self, *args, **kwargs):
        """Move or cast the teacher and the head together (as nn.Module.to)."""
        self.teacher.to(*args, **kwargs)
        self.head.to(*args, **kwargs)
        return self

    @property
    def dtype(self):
        return self.teacher.dtype

    def num_params(self) -> int:
        """Trainable (head) parameters: what a draft checkpoint stores."""
        return sum(p.numel() for p in self.head.parameters())

    # -- the trunk (exact teacher) -----------------------------------------------------------------------------

    def trunk(self, ids, positions=None):
        """(features (B, S, H) before the final norm, logits (B, S, V)) of the teacher over ids (B, S)."""
        teacher = self.teacher
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)
        features = run_blocks(teacher.blocks, teacher.tok_emb(ids), positions, teacher.inv_freq,
                              lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, 0, 1))
        return features, teacher.lm_head(teacher.norm(features))

    def teacher_window_logits(self, ids, window_tokens):
        """Teacher logits after every row of token windows: ids (B, N), window_tokens (B, W, m) -> (B, W, m, V).

        Window t holds real tokens at positions t+1..t+m after context 0..t (the staircase of §3 with token rows),
        so its row j gives the teacher's exact distribution of the token at t+2+j given those tokens.
        """
        teacher = self.teacher
        batch, context = ids.shape
        windows, rows = window_tokens.shape[1], window_tokens.shape[2]
        x = teacher.tok_emb(torch.cat([ids, window_tokens.flatten(1)], dim=1))
        features = run_blocks(teacher.blocks, x, self._staircase_positions(context, windows, rows, ids.device),
                              teacher.inv_freq,
                              lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, windows, rows))
        logits = teacher.lm_head(teacher.norm(features[:, context:]))
        return logits.view(batch, windows, rows, -1)

    @staticmethod
    def _staircase_positions(context, windows, rows, device):
        window = torch.arange(windows, device=device)[:, None] + 1 + torch.arange(rows, device=device)[None, :]
        return torch.cat([torch.arange(context, device=device), window.flatten()])

    # -- the head -----------------------------------------------------------------------------------------------

    def window_inputs(self, y1, u, tau):
        """The head's input rows of every window: (B, W, rows, H) = [tok_emb(y1) | e(u_2..), tau)].

        y1: (B, W) exact first tokens; u: (B, W, k) uniforms of tokens 1..k (u[..., 0] is y1's, unused here).
        """
        k = u.shape[2]
        hints = u[..., 1:self.head.config.window_rows(k)]
        y1_rows = self.teacher.tok_emb(y1)[:, :, None]
        if hints.shape[2] == 0:
            return y1_rows
        if isinstance(tau, torch.Tensor) and tau.dim() == 1:
            tau = tau.to(u.device).view(-1, 1, 1).expand(hints.shape)
        return torch.cat([y1_rows, self.head.noise(hints, tau).to(y1_rows.dtype)], dim=2)

    def head_logits(self, x):
        """The teacher's LM head over the head's final norm: x (..., H) -> (..., V)."""
        return self.teacher.lm_head(self.head.norm(x))

    def draft_logits(self, ids, features, y1, u, tau):
        """Head logits for tokens 2..k of every window (training layout).

        Args:
            ids: (B, N) context; features: (B, N, H) the trunk's features of it (no gradient needed).
            y1: (B, W) exact first tokens of the windows anchored at 0..W-1; u: (B, W, k) their uniforms.
            tau: a float or a (B,) tensor.

        Returns:
            (B, W, k-1, V): onehot, logits whose argmax drafts token j+2; categorical, the distribution of
            token j+2 (as logits).
        """
        batch, context = ids.shape
        windows = u.shape[1]
        window_x = self.window_inputs(y1, u, tau)
        rows = window_x.shape[2]
        x = torch.cat([features.to(window_x.dtype), window_x.flatten(1, 2)], dim=1)
        hidden = run_blocks(self.head.blocks, x, self._staircase_positions(context, windows, rows, ids.device),
                            self.teacher.inv_freq,
                            lambda layer, q, kk, v: kforcing_ops.window_attention(q, kk, v, windows, rows))
        window_hidden = hidden[:, context:].view(batch, windows, rows, -1)
        if self.head.config.readout == "onehot":
            window_hidden = window_hidden[:, :, 1:]
        return self.head_logits(window_hidden)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling settings that define the teacher's distribution: what the head learns and what verifies it."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def sample_rows(logits, u, sampling: Sampling):
    """Exact tokens (...) from logits (..., V) and uniforms (...) under `sampling`."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    tokens = kforcing_ops.inverse_cdf_sample(flat, u.reshape(-1).contiguous(), sampling.temperature,
                                             sampling.top_k, sampling.top_p)
    return tokens.view(u.shape)


def drafts_from_logits(logits, u, readout, sampling: Sampling):
    """Draft tokens (..., k-1) from head logits (..., k-1, V) and the uniforms (..., k) of tokens 1..k.

    onehot: argmax. categorical: inverse_cdf_sample of each row's distribution with the uniform of its token,
    under the same sampling settings as the teacher (the distribution the head was trained to reproduce).
    """
    if readout == "onehot":
        return logits.float().argmax(-1)
    return sample_rows(logits, u[..., 1:], sampling)


__all__ = ["DraftStudent", "HeadConfig", "HintHead", "READOUTS", "Sampling", "drafts_from_logits", "sample_rows",
           "teacher_fingerprint"]
