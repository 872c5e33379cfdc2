"""The push-forward student: the teacher's backbone plus a noise embedding, k tokens per forward pass.

    PushForwardLM    G(x, u_1..u_k): the same Transformer as the AR teacher (`kforcing.models.transformer`) plus a
                     noise embedding e(u, tau) for hint rows, `max_k` hints per window. `forward_train` runs the
                     staircase layout of docs/method.md §3; `decode` runs one [committed | hints] step of section 4.
                     The LM head runs only on hint rows.

Layouts. Hint i (0-based) of the window anchored at context position t predicts the token at position t+1+i and
carries that rotary position. In `forward_train` the sequence is [N context rows | num_windows windows]; window t
is anchored at context t. In decoding the rows are [committed tokens | hints], attending causally to a KV cache
that holds real tokens only (`KVCache`).
"""

import dataclasses
from typing import Optional

import torch
from einops import rearrange

import kforcing_ops
from kforcing_ops.nn import NoiseEmbedding

from ...models.transformer import ModelConfig, Transformer


def broadcast_tau(tau, like):
    """The temperature of every element of `like` (B, ...): a float stays a float; a 0-d tensor or a (B,) tensor
    (one temperature per sequence) becomes a tensor of like's shape on like's device.

    The one place a temperature argument is normalised: the noise embedding, the distillation targets and the
    noise-inversion baseline all take tau as a float or per sequence.
    """
    if not isinstance(tau, torch.Tensor):
        return float(tau)
    if tau.dim() == 0:
        return tau.to(like.device).expand(like.shape)
    if tau.dim() != 1 or tau.shape[0] != like.shape[0]:
        raise ValueError(f"`tau` must be a float, a 0-d tensor or a (B,) tensor with B={like.shape[0]}, "
                         f"got shape {tuple(tau.shape)}")
    return tau.to(like.device).view(-1, *([1] * (like.dim() - 1))).expand(like.shape)


class PushForwardLM(Transformer):
    """The K-Forcing student G(x, u_1..u_k): k tokens per forward pass (docs/method.md §2-4).

    The teacher's backbone plus `noise`, a `kforcing_ops.nn.NoiseEmbedding` that gives hint rows their input
    vectors e(u_i, tau). Token i of a window is argmax of the logits at hint row i. `max_k` is the most hints per
    window it was built (trained) for; any k <= max_k decodes, since hint i only sees hints 0..i.
    """

    model_type = "pushforward"

    def __init__(self, config: ModelConfig, max_k: int, noise_num_freqs: Optional[int] = None):
        super().__init__(config)
        if not isinstance(max_k, int) or isinstance(max_k, bool) or max_k < 1:
            raise ValueError(f"PushForwardLM: max_k must be a positive int, got {max_k!r}")
        self.max_k = max_k
        self.noise = NoiseEmbedding(config.n_embd, num_freqs=noise_num_freqs)

    @classmethod
    def from_teacher(cls, teacher, max_k, noise_num_freqs=None):
        """A student initialised from `teacher` (an ARModel or a PushForwardLM): every backbone weight is copied,
        and so is the noise encoder when the teacher is a student (progressive distillation k -> 2k); for an AR
        teacher only the noise encoder is new. The student is placed on the teacher's device and dtype."""
        if not isinstance(teacher, Transformer):
            raise TypeError(f"from_teacher expects an ARModel or PushForwardLM, got {type(teacher).__name__}")
        if noise_num_freqs is None and isinstance(teacher, PushForwardLM):
            noise_num_freqs = teacher.noise.num_freqs
        student = cls(dataclasses.replace(teacher.config), max_k, noise_num_freqs=noise_num_freqs)
        student.to(device=teacher.device, dtype=teacher.dtype)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        not_noise = [key for key in missing if not key.startswith("noise.")]
        if unexpected or not_noise:
            raise RuntimeError(f"from_teacher: weights do not match (missing {not_noise}, unexpected {unexpected})")
        return student

    def export_config(self):
        return {**super().export_config(), "max_k": self.max_k, "noise_num_freqs": self.noise.num_freqs}

    # -- embeddings -------------------------------------------------------------------------------------------

    def embed_noise(self, u, tau):
        """e(u, tau): u (...) in [0, 1] float32/float64, tau a float or (B,) tensor -> (..., H)."""
        return self.noise(u, broadcast_tau(tau, u))

    def _embed_sequence(self, ids, u, tau):
        """[tok_emb(ids) | e(u, tau)] for ids (B, Tc) and u (B, Th): (B, Tc + Th, H)."""
        if u.shape[1] == 0:
            return self.tok_emb(ids)
        if isinstance(tau, torch.Tensor):
            tau = tau.to(u.device)
        return self.noise.embed_sequence(ids, self.tok_emb.weight, u, tau)

    def _check_u(self, u, shape, name="u"):
        if not isinstance(u, torch.Tensor) or u.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"`{name}` must be a float32 or float64 tensor of uniforms in [0, 1]")
        if tuple(u.shape) != tuple(shape):
            raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(u.shape)}")

    # -- training ---------------------------------------------------------------------------------------------

    def forward_train(self, ids, u, tau, window_size=None, window_tokens=None):
        """Hint logits of every window in one pass, over the staircase layout (docs/method.md §3 and §5).

        Args:
            ids: (B, N) context tokens, N <= max_seq_len.
            u: (B, num_windows, k) uniforms of the hint rows, 1 <= num_windows <= N, 1 <= k <= max_k. Window t
                is anchored at context position t: its rows predict the tokens at positions t+1, t+2, ...
            tau: the temperature the student is conditioned on: a float or a (B,) tensor.
            window_size: rows per window, k without `window_tokens`, m + k with it; inferred when None and
                checked when given.
            window_tokens: optional (B, num_windows, m) token ids fed as real token rows at the start of each
                window, at positions t+1..t+m, before its k hints at positions t+1+m..t+m+k. This is the
                self-forcing teacher pass of docs/method.md §5 (m = k: the teacher's own first k tokens).

        Returns:
            (B, num_windows, k, V) logits at the hint rows; hint i of window t predicts the token at position
            t+1+m+i.

        The sequence is [N context rows | num_windows windows of window_size rows]. A context row sees context
        up to itself; a window row sees context 0..t and the rows of its own window up to itself.
        """
        self._check_ids(ids)
        batch, context = ids.shape
        if context > self.config.max_seq_len:
            raise ValueError(f"context of {context} tokens is longer than max_seq_len={self.config.max_seq_len}")
        if not isinstance(u, torch.Tensor) or u.dim() != 3:
            raise ValueError("`u` must be a (batch, num_windows, k) tensor of uniforms, got "
                             f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
        num_windows, hints = u.shape[1], u.shape[2]
        self._check_u(u, (batch, num_windows, hints))
        if not 1 <= num_windows <= context:
            raise ValueError(f"num_windows (u.shape[1] = {num_windows}) must be in [1, N = {context}]")
        if not 1 <= hints <= self.max_k:
            raise ValueError(f"k = u.shape[2] = {hints} hints per window, but this student has max_k={self.max_k}")
        given = 0
        if window_tokens is not None:
            self._check_ids(window_tokens.flatten(1), "window_tokens")
            if window_tokens.dim() != 3 or tuple(window_tokens.shape[:2]) != (batch, num_windows):
                raise ValueError(f"`window_tokens` must have shape ({batch}, {num_windows}, m), "
                                 f"got {tuple(window_tokens.shape)}")
            given = window_tokens.shape[2]
        rows = given + hints
        if window_size is not None and window_size != rows:
            raise ValueError(f"window_size={window_size}, but u gives {hints} hint rows"
                             + (f" and window_tokens {given} token rows" if given else "") + f" ({rows} rows)")

        if given:
            windows = torch.cat([self.tok_emb(window_tokens), self.embed_noise(u, tau)], dim=2)
            x = torch.cat([self.tok_emb(ids), windows.flatten(1, 2)], dim=1)
        else:
            x = self._embed_sequence(ids, u.flatten(1), tau)

        device = ids.device
        window_pos = (torch.arange(num_windows, device=device)[:, None] + 1
                      + torch.arange(rows, device=device)[None, :]).flatten()
        positions = torch.cat([torch.arange(context, device=device), window_pos])
        hidden = self._run(x, positions,
                           lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, num_windows, rows))
        hint_hidden = rearrange(hidden[:, context:], "b (w r) h -> b w r h", r=rows)[:, :, given:]
        return self.lm_head(hint_hidden)

    # -- decoding ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, ids, u, tau, cache, hint_embeddings=None):
        """One K-Forcing step: [committed ids | hints] against the cache; returns hint logits (B, k, V).

        Args:
            ids: (B, T) tokens to commit, at positions cache.seqlens[b] + 0..T-1 (the prompt at step 1, the k
                tokens of the previous step later). They are appended to the cache.
            u: (B, k) uniforms of the hints, float32/float64, k <= max_k (k = 0: a prefill with no logits).
            tau: temperature conditioning: a float or a (B,) tensor.
            cache: a `KVCache`; its lengths advance by T.
            hint_embeddings: optional (B, k, H) = embed_noise(u, tau), computed ahead of time (the uniforms of a
                whole generation are known before it starts, so `generate_kforcing` embeds them in a few
                batched calls instead of one per step). u and tau are then only used for shape checks.

        Hint i sits at position cache.seqlens[b] + T + i: it predicts the token there.
        """
        self._check_ids(ids)
        if not isinstance(u, torch.Tensor) or u.dim() != 2:
            raise ValueError("`u` must be a (batch, k) tensor of uniforms")
        self._check_u(u, (ids.shape[0], u.shape[1]))
        if u.shape[1] > self.max_k:
            raise ValueError(f"k = {u.shape[1]} hints, but this student has max_k={self.max_k}")
        committed = ids.shape[1]
        if hint_embeddings is None:
            x = self._embed_sequence(ids, u, tau)
        else:
            expected = (ids.shape[0], u.shape[1], self.config.n_embd)
            if tuple(hint_embeddings.shape) != expected:
                raise ValueError(f"`hint_embeddings` must have shape {expected}, got {tuple(hint_embeddings.shape)}")
            x = torch.cat([self.tok_emb(ids), hint_embeddings.to(self.tok_emb.weight.dtype)], dim=1)
        hidden = self._decode_run(x, cache, committed)
        if u.shape[1] == 0:
            return None
        return self.lm_head(hidden[:, committed:])




__all__ = ["PushForwardLM", "broadcast_tau"]
