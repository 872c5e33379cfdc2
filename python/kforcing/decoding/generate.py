"""Decoding: AR (the teacher) and K-Forcing (the student), over one static KV cache and one noise source.

Noise. Every uniform is `kforcing.noise.counter_uniform(seed, sequence_id, position)`: a pure function of the
request's seed, the sequence's id (default: its index in the request) and the absolute position of the token it
samples. A sample therefore depends only on (prompt, seed, sequence id), never on the other prompts of the batch,
and AR and K-Forcing use the same u for the same position, so their samples are coupled token for token:

    AR:         y_p = inverse_cdf_sample(teacher logits at p - 1, u(seed, b, p), temperature, top_k, top_p)
    K-Forcing:  y_p = argmax(student logits at the hint row for p, conditioned on u(seed, b, p) and tau)

Passes (docs/method.md §4), with P the prompt length:
    AR          [prompt] -> token P, then one row per token: max_new_tokens passes.
    K-Forcing   [prompt | k hints] -> tokens P..P+k-1, then [k committed | k hints] per step:
                ceil(max_new_tokens / k) passes.

Ragged prompts. A batch of prompts of lengths P_b runs one extra prefill pass first: it commits the first
P_b - min(P) tokens of every prompt (right-padded; the padding rows are written past each sequence's length and
overwritten before they are ever read). Then every sequence has exactly min(P) prompt tokens left, and the loop
runs with identical shapes for all sequences. Every decoder prefills this way (`kforcing.decoding.prefill`).

Row invariance. Every pass after the prefill runs inside `kforcing_ops.nn.row_invariant_linears()`: a row's
logits have the same bits whatever rows share its pass (the kernels' per-row order), so a draft student's
verify pass over B x k rows reproduces this AR step's B rows exactly, at any batch size.

Stopping. Exactly `max_new_tokens` tokens are produced per sequence unless it emits `eos_id`. A sequence that has
emitted EOS keeps its slot (shapes stay static): its later outputs are replaced by `pad_id` (masked) and the
loop ends early once every sequence has finished.

Static shapes. After the first step every step of a loop has the same shapes and only mutates the preallocated
cache in place, so it can be compiled (`compile=True`: torch.compile of the step, compiled once per process and
shape) or, on CUDA, captured and replayed as a CUDA graph (`cuda_graph=True`: every pass but the ragged prefill,
one graph per shape; needs CUDA kernels for every op in the step, since the pure-PyTorch fallbacks synchronise
with the host). With cuda_graph=True the KV cache and its graphs are kept with the model and reused by the next
call of the same batch size that fits in it (a graph replays fixed addresses), so such calls on one model must not run
concurrently; in-place weight updates are seen by the graphs, replacing parameter tensors is not.
"""

import dataclasses
import math
from typing import List, Optional, Sequence, Union

import torch

import kforcing_ops
from kforcing_ops.nn import row_invariant_linears

from ..teachers.hf_teacher import HFTeacher
from ..teachers.protocol import check_teacher
from .engine import RoundLoop
from .prefill import prefill_ragged_prefix
from .request import prompt_batch, uniform_table
from .steps import Step, make_cache

_HINT_CHUNK_ELEMENTS = 1 << 24  # hint embeddings computed ahead, per chunk (64 MiB in float32)


@dataclasses.dataclass
class GenerationOutput:
    """The result of `generate_ar` / `generate_kforcing`.

    Attributes:
        tokens: (B, max_new_tokens) int64: the generated tokens; positions after a sequence's EOS hold pad_id.
        lengths: (B,) int64: valid tokens per sequence (up to and including EOS).
        num_passes: forward passes of the model (prefill included).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    num_passes: int

    def tolist(self) -> List[List[int]]:
        """The generated tokens of every sequence, without padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.lengths.cpu().tolist())]


def _prefill_prefix(model, cache, prompts, pad_id):
    """The ragged-prefix pass (`kforcing.decoding.prefill`); returns the passes run (0 or 1)."""
    def run(ids):
        if getattr(model, "model_type", None) == "pushforward":  # token rows only: no hint rows
            return model.decode(ids, ids.new_empty((ids.shape[0], 0), dtype=torch.float64), 1.0, cache)
        return model.decode(ids, cache, logits=None)

    return prefill_ragged_prefix(run, cache.seqlens, prompts, pad_id)[0]


def _ar_step(model, cache, ids):
    return model.decode(ids, cache, logits="last")


def _kforcing_step(student, cache, tau, ids, u, hints):
    return student.decode(ids, u, tau, cache, hint_embeddings=hints)


# ---------------------------------------------------------------------------------------------------------
# AR decoding


@torch.no_grad()
def generate_ar(model, prompts: Union[Sequence[Sequence[int]], torch.Tensor], max_new_tokens: int,
                seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, *,
                eos_id: Optional[int] = None, pad_id: int = 0, sequence_ids=None, compile: bool = False,
                cuda_graph: bool = False, order: str = "vocab") -> GenerationOutput:
    """Sample from the AR teacher, one token per pass, with explicit counter-based uniforms.

    Token p of sequence b is `kforcing_ops.inverse_cdf_sample(logits, u(seed, sequence_ids[b], p), temperature,
    top_k, top_p)`, where logits are the model's next-token logits after positions 0..p-1. The result is a pure
    function of (prompt, seed, sequence id, sampling parameters).

    Args:
        model: a teacher (`kforcing.teachers.protocol`): an ARModel or a Hugging Face HFTeacher, in eval mode; decoding
            runs in its parameter dtype.
        prompts: a list of B prompts (token-id lists or 1-D tensors, lengths may differ), or a (B, P) tensor.
        max_new_tokens: tokens to generate per sequence (exactly, unless EOS comes first).
        seed: the request's seed.
        temperature, top_k, top_p: as in `kforcing_ops.inverse_cdf_sample`.
        eos_id: a token that ends a sequence (kept in the output); None disables stopping.
        pad_id: fills the output after EOS, and pads ragged prefills.
        sequence_ids: (B,) ints naming each sequence's noise stream; default 0..B-1. Pass the ids of a bigger
            request to reproduce part of it (a sample depends only on its own prompt and id).
        compile: torch.compile the per-token step (ARModel only).
        cuda_graph: replay the passes as CUDA graphs (CUDA only; ARModel only; see the module docstring).
        order: the CDF's token order, "vocab" or "descending" (`kforcing_ops.inverse_cdf_sample`): the same
            distribution, another map from u to tokens.

    Returns:
        GenerationOutput(tokens (B, max_new_tokens), lengths (B,), num_passes).
    """
    check_teacher(model, "generate_ar")
    if isinstance(model, HFTeacher) and (compile or cuda_graph):
        raise ValueError("compile and cuda_graph are for kforcing's own ARModel; decode a Hugging Face teacher "
                         "without them")
    prompts = prompt_batch(model, prompts, max_new_tokens, sequence_ids, eos_id, pad_id)
    tail, lengths = prompts.tail, prompts.lengths
    batch = tail.shape[0]
    cache, cuda_graphs = make_cache(model, batch, int(lengths.max()) + max_new_tokens, compile, cuda_graph)
    passes = _prefill_prefix(model, cache, prompts, pad_id)
    step = Step(_ar_step, (model, cache), cache, compile, cuda_graphs)

    # The first pass (the prompt) is captured too with cuda_graph, eager otherwise (one compile per shape is not
    # worth it for a single pass).
    logits = step(tail) if cuda_graph else model.decode(tail, cache, logits="last")
    loop = RoundLoop(batch, max_new_tokens, eos_id, pad_id, 1, tail.device)
    loop.count_passes(passes + 1)
    # Every uniform of the request is known up front: column s holds u(seed, b, lengths[b] + s) for every b.
    all_u = uniform_table(seed, prompts.sequence_ids, int(lengths.max()) + max_new_tokens).gather(
        1, lengths[:, None] + torch.arange(max_new_tokens, device=tail.device)).T.contiguous()
    with row_invariant_linears():  # every step's rows get the bits of any other decoder's pass over them
        for s in range(max_new_tokens):
            y = kforcing_ops.inverse_cdf_sample(logits.float(), all_u[s], temperature, top_k, top_p, order)
            if loop.record_all(y[:, None]):
                break
            logits = step(y[:, None])
            loop.count_passes()
    tokens, out_lengths, passes, _ = loop.result()
    return GenerationOutput(tokens, out_lengths, passes)


# ---------------------------------------------------------------------------------------------------------
# K-Forcing decoding


@torch.no_grad()
def generate_kforcing(student, prompts: Union[Sequence[Sequence[int]], torch.Tensor], max_new_tokens: int,
                      k: Optional[int] = None, seed: int = 0, temperature: float = 1.0,
                      freq_penalty: float = 0.0, *, eos_id: Optional[int] = None, pad_id: int = 0,
                      sequence_ids=None, compile: bool = False, cuda_graph: bool = False) -> GenerationOutput:
    """Sample k tokens per forward pass from a push-forward student (docs/method.md §4).

    Step 1 runs [prompt | k hints] in one pass; every later step runs [the k tokens of the previous step | k new
    hints] (2k rows) and appends the k tokens to the cache. Token p of sequence b is the argmax of the hint
    logits for position p, conditioned on u(seed, sequence_ids[b], p) and tau = temperature; with
    freq_penalty > 0 the argmax is of logits - freq_penalty * counts, counts being how often each token was
    generated in this sequence's earlier steps (the prompt is not counted).

    Args:
        student: a push-forward student (`kforcing.students.push_forward.model.PushForwardLM`, eval mode). A draft
            student decodes with `kforcing.students.draft.decode.generate_with_drafts` (verified: lossless, equal to
            `generate_ar` of its teacher).
        prompts, max_new_tokens, seed, eos_id, pad_id, sequence_ids, compile, cuda_graph: as in `generate_ar`.
        k: tokens per pass, 1 <= k <= student.max_k (default max_k).
        temperature: tau, the temperature the student is conditioned on (> 0).
        freq_penalty: lambda of the frequency penalty (0 disables it).

    Returns:
        GenerationOutput(tokens (B, max_new_tokens), lengths (B,), num_passes); the last step's surplus tokens
        (when k does not divide max_new_tokens) are dropped.
    """
    if getattr(student, "model_type", None) != "pushforward":
        hint = (" decode a draft student with kforcing.students.draft.decode.generate_with_drafts"
                if getattr(student, "model_type", None) == "draft" else "")
        raise TypeError(f"generate_kforcing needs a push-forward student (PushForwardLM), got "
                        f"{type(student).__name__}" + (f";{hint}" if hint else ""))
    k = student.max_k if k is None else k
    if not isinstance(k, int) or not 1 <= k <= student.max_k:
        raise ValueError(f"k={k!r} is not allowed: this student decodes 1 <= k <= max_k={student.max_k}")
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < math.inf):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    if freq_penalty < 0:
        raise ValueError(f"freq_penalty must be >= 0, got {freq_penalty}")
    prompts = prompt_batch(student, prompts, max_new_tokens, sequence_ids, eos_id, pad_id)
    tail, lengths = prompts.tail, prompts.lengths
    batch, device = tail.shape[0], tail.device
    num_steps = -(-max_new_tokens // k)
    cache_len = int(lengths.max()) + num_steps * k
    cache, cuda_graphs = make_cache(student, batch, cache_len, compile, cuda_graph)
    passes = _prefill_prefix(student, cache, prompts, pad_id)
    tau = float(temperature)
    step = Step(_kforcing_step, (student, cache, tau), cache, compile, cuda_graphs)

    # Every uniform of the request is known up front: u for position lengths[b] + i. Their hint embeddings are
    # computed in chunks of steps (one batched noise-encoder call per chunk instead of one per step).
    all_u = uniform_table(seed, prompts.sequence_ids, cache_len).gather(
        1, lengths[:, None] + torch.arange(num_steps * k, device=device)).view(batch, num_steps, k)
    chunk = max(1, min(num_steps, _HINT_CHUNK_ELEMENTS // max(1, batch * k * student.config.n_embd)))
    counts = torch.zeros((batch, student.config.vocab_size), device=device) if freq_penalty else None
    loop = RoundLoop(batch, max_new_tokens, eos_id, pad_id, k, device)
    loop.count_passes(passes)
    committed = tail
    for j in range(num_steps):
        if j % chunk == 0:
            hints = student.embed_noise(all_u[:, j:j + chunk], tau)
        u, hint = all_u[:, j], hints[:, j % chunk]
        if j == 0 and not cuda_graph:  # the prompt's tail and the first hints
            logits = student.decode(committed, u, tau, cache, hint_embeddings=hint)
        else:
            with row_invariant_linears():  # a sequence's rows get the same bits whatever batch it decodes in
                logits = step(committed, u, hint)
        loop.count_passes()
        scores = logits.float()
        if counts is not None:
            scores = scores - freq_penalty * counts[:, None, :]
        y = scores.argmax(dim=-1)
        if counts is not None:
            counts.scatter_add_(1, y, torch.ones_like(y, dtype=counts.dtype))
        committed = y
        if loop.record_all(y):
            break
    tokens, out_lengths, passes, _ = loop.result()
    return GenerationOutput(tokens, out_lengths, passes)


__all__ = ["GenerationOutput", "generate_ar", "generate_kforcing"]
