"""Pure measurements of models and samples (docs/method.md §6): each a function of its inputs and the seed.

    coupled_agreement      the student's k tokens per pass vs the teacher's, from the same contexts and uniforms
    perplexity             exp(mean NLL) of samples under an AR model
    text_statistics        unigram entropy, distinct-n, longest repeated n-gram of token sequences
    sample_quality         both of the above for one set of samples (with an optional re-tokenising reference)
    decode_speed           tokens/s of AR vs K-Forcing decoding, interleaved rounds (bench/bench_decode.py too)

`kforcing.evaluation.evaluate` runs them over checkpoints; `kforcing.training.distill` logs the coupled agreement during
training.
"""

import math
import statistics
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch

from ..data import Tokenizer
from ..decoding.generate import generate_ar, generate_kforcing
from ..models.transformer import ARModel, Transformer
from ..students.push_forward import PushForwardLM
from ..teachers.protocol import is_teacher


class EvalError(ValueError):
    """The models, samples or settings of a measurement do not fit together."""


# ---------------------------------------------------------------------------------------------------------
# Text statistics (pure functions of token lists)


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy in nats of the token frequencies of one sequence: -sum_v f_v log f_v (0 for an empty sequence)."""
    n = len(tokens)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values())


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Distinct n-grams / n-grams of one sequence (1.0 when it is shorter than n: nothing repeats)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_repeated_ngram(tokens: Sequence[int]) -> int:
    """The largest n such that some n-gram occurs at least twice in the sequence (occurrences may overlap).

    0 when no token repeats. Binary search over n: if an n-gram repeats, so does its (n-1)-gram prefix.
    """
    tokens = list(tokens)

    def repeats(n):
        seen = set()
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i:i + n])
            if gram in seen:
                return True
            seen.add(gram)
        return False

    low, high = 0, max(0, len(tokens) - 1)
    while low < high:
        mid = (low + high + 1) // 2
        if repeats(mid):
            low = mid
        else:
            high = mid - 1
    return low


def text_statistics(samples: Sequence[Sequence[int]]) -> Dict[str, float]:
    """Mean unigram entropy, distinct-2/3 and longest repeated n-gram (mean, max) over samples."""
    if not samples:
        raise EvalError("text_statistics needs at least one sample")
    repeats = [longest_repeated_ngram(s) for s in samples]
    return {
        "unigram_entropy": statistics.fmean(unigram_entropy(s) for s in samples),
        "distinct_2": statistics.fmean(distinct_n(s, 2) for s in samples),
        "distinct_3": statistics.fmean(distinct_n(s, 3) for s in samples),
        "longest_repeat_mean": statistics.fmean(repeats),
        "longest_repeat_max": max(repeats),
    }


# ---------------------------------------------------------------------------------------------------------
# Coupled agreement


def agreement_from_tokens(teacher_tokens: torch.Tensor, student_tokens: torch.Tensor) -> Dict:
    """Per-offset agreement and whole-window exact match of two (windows, k) token tensors."""
    if teacher_tokens.shape != student_tokens.shape or teacher_tokens.dim() != 2:
        raise EvalError(f"token windows must be two (windows, k) tensors of one shape, got "
                        f"{tuple(teacher_tokens.shape)} and {tuple(student_tokens.shape)}")
    if teacher_tokens.shape[0] == 0:
        raise EvalError("no windows to compare")
    same = teacher_tokens.cpu() == student_tokens.cpu()
    return {"k": same.shape[1], "windows": same.shape[0], "per_offset": same.float().mean(0).tolist(),
            "exact_match": same.all(1).float().mean().item()}


def check_compatible(teacher: Transformer, student: Transformer, teacher_tokenizer: Optional[Tokenizer] = None,
                     student_tokenizer: Optional[Tokenizer] = None, names=("teacher", "student")):
    """Raise EvalError when two models cannot be compared token for token (vocabularies or tokenizers differ)."""
    a, b = teacher.config.vocab_size, student.config.vocab_size
    if a != b:
        raise EvalError(f"the {names[0]} and {names[1]} vocabularies differ ({a} vs {b} tokens): they were not "
                        f"made from one tokenizer, so their tokens cannot be compared")
    if teacher_tokenizer is not None and student_tokenizer is not None and \
            teacher_tokenizer.fingerprint() != student_tokenizer.fingerprint():
        raise EvalError(f"the {names[0]} and {names[1]} tokenizers differ (same size {a}, other tokens): their "
                        "tokens cannot be compared")


@torch.no_grad()
def window_tokens(model: Transformer, contexts: List[List[int]], k: int, seed: int = 0, temperature: float = 1.0,
                  batch_size: int = 64, model_k: Optional[int] = None) -> torch.Tensor:
    """(len(contexts), k) tokens each model emits after each context, with the uniforms u(seed, i, position).

    ARModel: sequential inverse-CDF sampling (`generate_ar`). PushForwardLM: `generate_kforcing` with model_k tokens
    per pass (default k; must be <= its max_k).
    """
    return _generate_in_batches(model, contexts, k, seed, temperature, model_k or k, 0.0, batch_size)


def coupled_agreement(teacher: Transformer, student: PushForwardLM, contexts: List[List[int]], k: int,
                      seed: int = 0, temperature: float = 1.0, batch_size: int = 64,
                      teacher_k: Optional[int] = None) -> Dict:
    """Agreement of the student's k tokens per pass with the teacher's tokens from the same contexts and uniforms.

    The teacher is the AR model (sequential inverse CDF) or a K-Forcing student decoding teacher_k tokens per pass
    (default min(k, its max_k): for a stage-k teacher of a 2k student, its two consecutive decode steps).
    Returns {"k", "windows", "per_offset": [agreement at offsets 1..k], "exact_match"}.
    """
    if not isinstance(student, PushForwardLM):
        raise TypeError(f"the student must be a PushForwardLM, got {type(student).__name__}")
    if not 1 <= k <= student.max_k:
        raise EvalError(f"k={k} is not allowed: the student decodes 1 <= k <= max_k={student.max_k}")
    check_compatible(teacher, student)
    if isinstance(teacher, PushForwardLM) and teacher_k is None:
        teacher_k = min(k, teacher.max_k)
    reference = window_tokens(teacher, contexts, k, seed, temperature, batch_size, model_k=teacher_k)
    got = window_tokens(student, contexts, k, seed, temperature, batch_size)
    return agreement_from_tokens(reference, got)


# ---------------------------------------------------------------------------------------------------------
# Sample quality


@torch.no_grad()
def perplexity(model: ARModel, prompts: List[List[int]], samples: List[List[int]], batch_size: int = 16) -> float:
    """exp(mean NLL) of the sample tokens under `model` (temperature 1), each sample scored after its prompt.

    Sequences longer than the model's max_seq_len are scored over their last max_seq_len tokens (with the
    earliest sample tokens then as context only).
    """
    if not is_teacher(model):
        raise TypeError(f"perplexity needs an AR teacher (an ARModel or an HFTeacher), got {type(model).__name__}")
    if len(prompts) != len(samples):
        raise EvalError(f"{len(prompts)} prompts for {len(samples)} samples")
    limit = model.config.max_seq_len + 1
    total, count = 0.0, 0
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]) + len(samples[i]))
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        sequences, scored = [], []
        for i in chunk:
            sequence = list(prompts[i]) + list(samples[i])
            start = max(len(prompts[i]), 1)
            if len(sequence) > limit:
                cut = len(sequence) - limit
                sequence, start = sequence[cut:], max(start - cut, 1)
            sequences.append(sequence)
            scored.append(start)
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.int64)
        mask = torch.zeros(len(sequences), width - 1, dtype=torch.bool)
        for row, (sequence, start) in enumerate(zip(sequences, scored)):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, start - 1:len(sequence) - 1] = True
        ids = ids.to(model.device)
        logits = model(ids[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll = nll.view(mask.shape).cpu()
        total += nll[mask].double().sum().item()
        count += int(mask.sum())
    if count == 0:
        raise EvalError("no sample tokens to score")
    return math.exp(total / count)


@torch.no_grad()
def generate_samples(model: Transformer, prompts: List[List[int]], length: int, seed: int = 0,
                     temperature: float = 1.0, k: Optional[int] = None, freq_penalty: float = 0.0,
                     batch_size: int = 16) -> List[List[int]]:
    """`length` tokens after each prompt, in batches; sample i always uses the noise stream i (batch-independent)."""
    return _generate_in_batches(model, prompts, length, seed, temperature, k, freq_penalty, batch_size).tolist()


def _generate_in_batches(model: Transformer, prompts, length, seed, temperature, k, freq_penalty, batch_size):
    """(len(prompts), length) tokens; sequence i draws the noise stream i whatever the batching."""
    rows = []
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin:begin + batch_size]
        ids = list(range(begin, begin + len(chunk)))
        if is_teacher(model):
            out = generate_ar(model, chunk, length, seed=seed, temperature=temperature, sequence_ids=ids)
        elif isinstance(model, PushForwardLM):
            out = generate_kforcing(model, chunk, length, k=k, seed=seed, temperature=temperature,
                                    freq_penalty=freq_penalty, sequence_ids=ids)
        else:
            raise TypeError(f"expected an AR teacher or a PushForwardLM, got {type(model).__name__}")
        rows.append(out.tokens.cpu())
    return torch.cat(rows) if rows else torch.empty(0, length, dtype=torch.long)


def _retokenize(samples, prompts, tokenizer: Tokenizer, reference_tokenizer: Tokenizer):
    texts = [tokenizer.decode(s) for s in samples]
    prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]  # the EOS start is re-added
    new_prompts = [[reference_tokenizer.eos_id] + reference_tokenizer.encode(t) for t in prompt_texts]
    return new_prompts, [reference_tokenizer.encode(t) or [reference_tokenizer.eos_id] for t in texts]


def sample_quality(samples, prompts, teacher: ARModel, reference: Optional[ARModel] = None,
                   tokenizer: Optional[Tokenizer] = None, reference_tokenizer: Optional[Tokenizer] = None,
                   batch_size: int = 16) -> Dict[str, float]:
    """Perplexity under the teacher (and the reference) plus `text_statistics` of one set of samples."""
    result = {"ppl_teacher": perplexity(teacher, prompts, samples, batch_size)}
    if reference is not None:
        if reference_tokenizer is not None and tokenizer is not None and \
                reference_tokenizer.fingerprint() != tokenizer.fingerprint():
            ref_prompts, ref_samples = _retokenize(samples, prompts, tokenizer, reference_tokenizer)
        else:
            ref_prompts, ref_samples = prompts, samples
        result["ppl_reference"] = perplexity(reference, ref_prompts, ref_samples, batch_size)
    result.update(text_statistics(samples))
    return result


def common_prefix(a, b) -> int:
    """The number of leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# Decode speed


def time_interleaved(runs: Dict, device, repeats: int, progress=None) -> Dict:
    """Times whole calls of every function in `runs` ({name: fn}), interleaved: one warm-up call each, then
    `repeats` rounds that call each once in a rotated order, so that a load spike on a shared machine hits every
    function alike. Returns {name: (per-round seconds, the last call's result)}."""
    device = torch.device(device)
    names = list(runs)
    results = {name: runs[name]() for name in names}  # warm-up
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[name] = runs[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return {name: (times[name], results[name]) for name in names}


def decode_speed(teacher: ARModel, student: PushForwardLM, ks: Sequence[int], batch_sizes: Sequence[int],
                 prompts: List[List[int]], new_tokens: int, repeats: int = 3, progress=None, seed: int = 0,
                 **options) -> List[Dict]:
    """Tokens/s of generate_ar vs generate_kforcing at each k, per batch size, measured in interleaved rounds.

    prompts: at least max(batch_sizes) prompts of one length; options: further generate arguments (compile,
    cuda_graph). For each batch size: one warm-up call of every decoder, then `repeats` rounds that call each
    decoder once (rotating the order). Rows: {"batch", "decoder" ("AR" or "k=K"), "k" (0 for AR), "seconds"
    (median), "tokens_per_s", "passes", "ms_per_pass", "speedup" (median over rounds of AR time / this time)}.
    """
    if len(prompts) < max(batch_sizes):
        raise EvalError(f"decode_speed needs {max(batch_sizes)} prompts, got {len(prompts)}")
    rows = []
    for batch in batch_sizes:
        chunk = prompts[:batch]
        runs = {"AR": lambda: generate_ar(teacher, chunk, new_tokens, seed=seed, **options)}
        for k in ks:
            runs[f"k={k}"] = (lambda k=k: generate_kforcing(student, chunk, new_tokens, k=k, seed=seed, **options))
        measured = time_interleaved(runs, teacher.device, repeats, progress)
        for name, (times, out) in measured.items():
            seconds = statistics.median(times)
            ratios = [a / b for a, b in zip(measured["AR"][0], times)]
            rows.append({"batch": batch, "decoder": name, "k": 0 if name == "AR" else int(name[2:]),
                         "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "passes": out.num_passes,
                         "ms_per_pass": 1e3 * seconds / out.num_passes, "speedup": statistics.median(ratios)})
    return rows


__all__ = ["EvalError", "agreement_from_tokens", "check_compatible", "common_prefix", "coupled_agreement",
           "decode_speed", "distinct_n", "generate_samples", "longest_repeated_ngram", "perplexity", "sample_quality",
           "text_statistics", "time_interleaved", "unigram_entropy", "window_tokens"]
