"""Pure measurements of models and samples (docs/method.md §6): each a function of its inputs and the seed.

    agreement_from_tokens  per-offset agreement of two sets of token windows
    perplexity             exp(mean NLL) of samples under an AR model
    text_statistics        unigram entropy, distinct-n, longest repeated n-gram of token sequences
    sample_quality         both of the above for one set of samples (with an optional re-tokenising reference)
    time_interleaved       whole calls of several decoders timed in interleaved rounds

Each student kind's evaluation (`kforcing.students.*.evaluate`) builds its measurements on them;
`kforcing.workflows.evaluate` runs them over checkpoints.
"""

import math
import statistics
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch

from ..data import Tokenizer
from ..models.transformer import ARModel, Transformer
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


__all__ = ["EvalError", "agreement_from_tokens", "check_compatible", "common_prefix", "distinct_n",
           "longest_repeated_ngram", "perplexity", "sample_quality", "text_statistics", "time_interleaved",
           "unigram_entropy"]
