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
runs with identical shapes for all sequences.

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
import weakref
from typing import List, Optional, Sequence, Union

import torch

import kforcing_ops
from kforcing_ops.nn import decode_linear_enabled

from ..models.transformer import KVCache
from ..noise import counter_uniform
from ..teachers.hf_teacher import HFTeacher
from ..teachers.protocol import check_teacher
from .compiled import compiled, static_length
from .engine import RoundLoop
from .request import check_request

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


# ---------------------------------------------------------------------------------------------------------
# Shared plumbing


def _prepare(model, prompts, max_new_tokens, sequence_ids, eos_id, pad_id):
    """Validate, pad, and split the prompts into (prefix for the ragged prefill, uniform tail)."""
    prompt_list, sequence_ids = check_request(model, prompts, max_new_tokens, sequence_ids, eos_id, pad_id)
    device = model.device
    lengths = [len(p) for p in prompt_list]
    shortest = min(lengths)
    prefix = [p[:len(p) - shortest] for p in prompt_list]
    tail = torch.tensor([p[len(p) - shortest:] for p in prompt_list], dtype=torch.int64, device=device)
    return prefix, tail, torch.tensor(lengths, dtype=torch.int64, device=device), sequence_ids


def _prefill_prefix(model, cache, prefix, pad_id):
    """Commit the ragged prompt prefixes (one pass); returns the number of passes run (0 or 1)."""
    longest = max(len(p) for p in prefix)
    if longest == 0:
        return 0
    ids = torch.full((len(prefix), longest), pad_id, dtype=torch.int64)
    for b, p in enumerate(prefix):
        ids[b, :len(p)] = torch.tensor(p, dtype=torch.int64)
    ids = ids.to(cache.seqlens.device)
    if getattr(model, "model_type", None) == "pushforward":  # token rows only: no hint rows
        model.decode(ids, ids.new_empty((len(prefix), 0), dtype=torch.float64), 1.0, cache)
    else:
        model.decode(ids, cache, logits=None)
    cache.seqlens.copy_(torch.tensor([len(p) for p in prefix], dtype=torch.int32))
    return 1


def _ar_step(model, cache, ids):
    return model.decode(ids, cache, logits="last")


def _kforcing_step(student, cache, tau, ids, u, hints):
    return student.decode(ids, u, tau, cache, hint_embeddings=hints)


_MAX_GRAPHS = 16  # captured shapes kept per pooled cache; further shapes run eagerly
_graph_pool = weakref.WeakKeyDictionary()  # model -> _CudaGraphs (cuda_graph=True only)


@dataclasses.dataclass
class _CudaGraphs:
    """The KV cache and the CUDA graphs captured against it, kept between generate calls of one model.

    A CUDA graph replays fixed memory addresses, so it can only be reused with the very cache it was captured
    against: with cuda_graph=True the cache of the last call (same batch size, dtype and device, and at least as
    long as needed) is kept and reset instead of reallocated, and graphs are captured once per step shape and
    reused by later calls (so calls with different k or lengths share one cache instead of evicting each other).
    This makes concurrent generate calls with cuda_graph=True on one model unsafe (one thread at a time).
    """

    key: tuple
    cache: KVCache
    graphs: dict = dataclasses.field(default_factory=dict)
    pool: object = dataclasses.field(default_factory=lambda: torch.cuda.graph_pool_handle())


def _make_cache(model, batch, max_len, cuda_graph):
    """(cache, _CudaGraphs or None): a fresh cache, or with cuda_graph the model's pooled one, reset."""
    if not cuda_graph:
        return KVCache.for_model(model, batch, max_len), None
    if model.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    key = (batch, model.dtype, model.device, model.config)
    entry = _graph_pool.get(model)
    if entry is None or entry.key != key or entry.cache.max_len < max_len:
        _graph_pool.pop(model, None)  # free the previous cache and graphs first
        entry = _CudaGraphs(key, KVCache.for_model(model, batch, max_len))
        _graph_pool[model] = entry
    entry.cache.reset()
    return entry.cache, entry


class _Step:
    """A decode step function run eagerly, compiled, or replayed from a CUDA graph (one graph per input shape).

    fn(*bound, *inputs): `bound` are the model, the cache and constants; `inputs` the per-step tensors. The step
    mutates the KV cache in place and returns a tensor. For a CUDA graph (`cuda_graphs` given) the inputs are
    copied into static buffers; warm-up runs happen on a side stream with the cache lengths restored afterwards,
    so they leave no trace (the rows they wrote are rewritten by the real step). Graphs are keyed by the
    function, the constants, the linear layers' mode (`kforcing_ops.nn.torch_linears`) and the input shapes.
    """

    def __init__(self, fn, bound, cache, compile=False, cuda_graphs: Optional[_CudaGraphs] = None):
        self.name = fn.__name__
        self.fn = compiled(fn) if compile else fn
        self.bound = tuple(bound)
        self.constants = tuple(b for b in self.bound[2:] if not isinstance(b, torch.Tensor))
        self.cache = cache
        self.cuda_graphs = cuda_graphs

    def __call__(self, *inputs):
        if self.cuda_graphs is None:
            return self.fn(*self.bound, *inputs)
        graphs = self.cuda_graphs.graphs
        key = (self.name, self.constants, decode_linear_enabled(), tuple((tuple(t.shape), t.dtype) for t in inputs))
        if key not in graphs:
            if len(graphs) >= _MAX_GRAPHS:
                return self.fn(*self.bound, *inputs)
            graphs[key] = self._capture(inputs)
        graph, static_inputs, static_output = graphs[key]
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        graph.replay()
        return static_output.clone()

    def _capture(self, inputs):
        static_inputs = [t.clone() for t in inputs]
        saved = self.cache.seqlens.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*self.bound, *static_inputs)
                self.cache.seqlens.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.cuda_graphs.pool):
            static_output = self.fn(*self.bound, *static_inputs)
        self.cache.seqlens.copy_(saved)  # capture records the += n_commit without running it
        return graph, static_inputs, static_output


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
    prefix, tail, lengths, sequence_ids = _prepare(model, prompts, max_new_tokens, sequence_ids, eos_id, pad_id)
    batch = tail.shape[0]
    cache_len = int(lengths.max()) + max_new_tokens
    cache, cuda_graphs = _make_cache(model, batch, static_length(cache_len) if compile else cache_len, cuda_graph)
    passes = _prefill_prefix(model, cache, prefix, pad_id)
    step = _Step(_ar_step, (model, cache), cache, compile, cuda_graphs)

    # The first pass (the prompt) is captured too with cuda_graph, eager otherwise (one compile per shape is not
    # worth it for a single pass).
    logits = step(tail) if cuda_graph else model.decode(tail, cache, logits="last")
    loop = RoundLoop(batch, max_new_tokens, eos_id, pad_id, 1, tail.device)
    loop.count_passes(passes + 1)
    # Every uniform of the request is known up front: row s holds u(seed, b, lengths[b] + s) for every b.
    all_u = counter_uniform(seed, sequence_ids[None, :],
                            lengths[None, :] + torch.arange(max_new_tokens, device=tail.device)[:, None])
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
    prefix, tail, lengths, sequence_ids = _prepare(student, prompts, max_new_tokens, sequence_ids, eos_id, pad_id)
    batch, device = tail.shape[0], tail.device
    num_steps = -(-max_new_tokens // k)
    cache_len = int(lengths.max()) + num_steps * k
    cache, cuda_graphs = _make_cache(student, batch, static_length(cache_len) if compile else cache_len, cuda_graph)
    passes = _prefill_prefix(student, cache, prefix, pad_id)
    tau = float(temperature)
    step = _Step(_kforcing_step, (student, cache, tau), cache, compile, cuda_graphs)

    # Every uniform of the request is known up front: u for position lengths[b] + i. Their hint embeddings are
    # computed in chunks of steps (one batched noise-encoder call per chunk instead of one per step).
    all_u = counter_uniform(seed, sequence_ids[:, None], lengths[:, None] + torch.arange(num_steps * k, device=device))
    all_u = all_u.view(batch, num_steps, k)
    chunk = max(1, min(num_steps, _HINT_CHUNK_ELEMENTS // max(1, batch * k * student.config.n_embd)))
    counts = torch.zeros((batch, student.config.vocab_size), device=device) if freq_penalty else None
    loop = RoundLoop(batch, max_new_tokens, eos_id, pad_id, k, device)
    loop.count_passes(passes)
    committed = tail
    for j in range(num_steps):
        if j % chunk == 0:
            hints = student.embed_noise(all_u[:, j:j + chunk], tau)
        u, hint = all_u[:, j], hints[:, j % chunk]
        if j == 0 and not cuda_graph:
            logits = student.decode(committed, u, tau, cache, hint_embeddings=hint)
        else:
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
