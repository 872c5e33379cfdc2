"""Evaluation of a K-Forcing student against its AR teacher (`kforcing eval`, METHOD.md section 6).

    kforcing eval --teacher runs/teacher --student runs/student --k 1,2,4 --out runs/eval

Three measurements, each reported for every k the student decodes with (any k <= its max_k):

Coupled agreement. Held-out contexts x (prefixes of the validation split, of varied lengths). For each context
and k, the teacher samples its next k tokens sequentially by inverse CDF (`generate_ar`) and the student emits k
tokens in one pass (`generate_kforcing`), both from the same uniforms u(seed, context index, position). Reported:
the fraction of windows in which the student's j-th token equals the teacher's j-th token (per offset j), and the
whole-window exact match. Only a push-forward model can be measured like this: it is a function of u.

Sample quality. N samples of L tokens from the same prompts and seeds, from the AR teacher and from the student at
each k, without and with the frequency penalty (the AR teacher has none). For each set:
    ppl_teacher       exp(mean NLL) of the sampled tokens under the teacher at temperature 1
    ppl_reference     the same under an optional reference LM (`reference`, a kforcing AR checkpoint; when its
                      tokenizer differs, the samples are decoded to text and re-tokenised with it)
    unigram_entropy   the entropy (nats) of each sample's own token frequencies, averaged over samples: low
                      entropy (repetitive text) makes perplexity look good, so both are always reported
    distinct_2/3      distinct n-grams / n-grams per sample, averaged
    longest_repeat    the length of the longest n-gram that occurs at least twice in a sample (mean and max)
Samples do not stop at EOS (fixed length, as in the field's generative-perplexity protocol).

Decode speed. Tokens/s of whole generate calls, AR vs the student at each k, same backbone, machine and run,
across batch sizes; interleaved rounds, medians, and the per-round speedup over AR.

Output (`run_eval`): eval.json, eval.md (Markdown tables) and PNG plots (quality vs k, agreement per offset,
throughput vs batch size) in the output directory. The quality targets of issue 6 are checked and stated as
reached or not, for the largest k evaluated.
"""

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import checkpoint as ckpt
from .data import TokenDataset, Tokenizer
from .generate import generate_ar, generate_kforcing
from .model import ARModel, PushForwardLM, Transformer
from .noise import counter_randint

# Quality targets of issue 6 (measured at the largest k, without frequency penalty).
TARGETS = {"agree_offset_1": 0.90, "agree_offset_4": 0.75, "ppl_ratio": 1.3, "entropy_rel": 0.05}


class EvalError(ValueError):
    """The models or settings of an evaluation do not fit together."""


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


def heldout_contexts(dataset: TokenDataset, num: int, max_len: int, min_len: int = 4, seed: int = 0,
                     split: str = "val") -> List[List[int]]:
    """`num` contexts from a split: context i starts at a pseudo-random offset and has a pseudo-random length in
    [min_len, max_len], both pure functions of (seed, i)."""
    data = dataset.split(split)
    min_len = max(1, min(min_len, max_len))
    if len(data) <= max_len:
        raise EvalError(f"the {split} split has {len(data)} tokens, too few for contexts of {max_len} tokens")
    index = torch.arange(num, dtype=torch.int64)
    lengths = (min_len + counter_randint(seed ^ 0xC0, index, 0, max_len - min_len + 1)).tolist()
    starts = counter_randint(seed ^ 0xC1, index, 0, len(data) - max_len).tolist()
    return [[int(t) for t in data[s:s + n]] for s, n in zip(starts, lengths)]


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
    if not isinstance(model, ARModel):
        raise TypeError(f"perplexity needs an ARModel, got {type(model).__name__}")
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
        if isinstance(model, ARModel):
            out = generate_ar(model, chunk, length, seed=seed, temperature=temperature, sequence_ids=ids)
        elif isinstance(model, PushForwardLM):
            out = generate_kforcing(model, chunk, length, k=k, seed=seed, temperature=temperature,
                                    freq_penalty=freq_penalty, sequence_ids=ids)
        else:
            raise TypeError(f"expected an ARModel or PushForwardLM, got {type(model).__name__}")
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


# ---------------------------------------------------------------------------------------------------------
# Decode speed


def decode_speed(teacher: ARModel, student: PushForwardLM, ks: Sequence[int], batch_sizes: Sequence[int],
                 prompts: List[List[int]], new_tokens: int, repeats: int = 3, progress=None) -> List[Dict]:
    """Tokens/s of generate_ar vs generate_kforcing at each k, per batch size, measured in interleaved rounds.

    prompts: at least max(batch_sizes) prompts of one length. For each batch size: one warm-up call of every
    decoder, then `repeats` rounds that call each decoder once (rotating the order). Rows:
    {"batch", "decoder" ("AR" or "k=K"), "k" (0 for AR), "seconds" (median), "tokens_per_s", "passes",
    "ms_per_pass", "speedup" (median over rounds of AR time / this time)}.
    """
    if len(prompts) < max(batch_sizes):
        raise EvalError(f"decode_speed needs {max(batch_sizes)} prompts, got {len(prompts)}")
    rows = []
    for batch in batch_sizes:
        chunk = prompts[:batch]
        runs = {"AR": lambda: generate_ar(teacher, chunk, new_tokens, seed=0)}
        for k in ks:
            runs[f"k={k}"] = (lambda k=k: generate_kforcing(student, chunk, new_tokens, k=k, seed=0))
        names = list(runs)
        passes = {name: runs[name]().num_passes for name in names}  # warm-up
        times = {name: [] for name in names}
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if teacher.device.type == "cuda":
                    torch.cuda.synchronize(teacher.device)
                start = time.perf_counter()
                runs[name]()
                if teacher.device.type == "cuda":
                    torch.cuda.synchronize(teacher.device)
                times[name].append(time.perf_counter() - start)
            if progress is not None:
                progress.update(1)
        for name in names:
            seconds = statistics.median(times[name])
            ratios = [a / b for a, b in zip(times["AR"], times[name])]
            rows.append({"batch": batch, "decoder": name, "k": 0 if name == "AR" else int(name[2:]),
                         "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "passes": passes[name],
                         "ms_per_pass": 1e3 * seconds / passes[name], "speedup": statistics.median(ratios)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclasses.dataclass
class EvalConfig:
    """Settings of `kforcing eval` (see `kforcing eval --help`).

    teacher / student: checkpoint or run directories (a distill run resolves to its final student).
    ks: the k values to evaluate (default: 1, 2, 4, ... up to the student's max_k).
    contexts: held-out contexts for the coupled agreement; context_len: their longest length (default: the length
        the student was distilled on, `trained_context_length`).
    num_samples, sample_len: samples per set and tokens per sample; prompt_len 0 = unconditional samples (the
        prompt is the EOS token), > 0 = held-out prefixes of that length.
    freq_penalty: the lambda of the "with penalty" student samples (0 skips them).
    batch_sizes / speed_tokens / speed_repeats: the decode benchmark (empty batch_sizes skips it).
    data_dir: token cache for held-out data (default: the student run's or teacher run's cache).
    """

    teacher: str
    student: str
    out_dir: Optional[str] = None
    ks: Optional[List[int]] = None
    reference: Optional[str] = None
    contexts: int = 256
    context_len: Optional[int] = None
    num_samples: int = 32
    sample_len: int = 128
    prompt_len: int = 0
    temperature: float = 1.0
    freq_penalty: float = 1.0
    batch_sizes: List[int] = dataclasses.field(default_factory=lambda: [1, 8, 32])
    speed_tokens: int = 64
    speed_repeats: int = 3
    batch_size: int = 32
    data_dir: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    plots: bool = True
    progress: bool = True

    def validate(self):
        for name in ("contexts", "num_samples", "sample_len", "batch_size", "speed_tokens", "speed_repeats"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompt_len < 0:
            raise EvalError(f"prompt_len must be >= 0, got {self.prompt_len}")
        if not 0.0 < self.temperature < math.inf:
            raise EvalError(f"temperature must be positive, got {self.temperature}")
        if self.freq_penalty < 0:
            raise EvalError(f"freq_penalty must be >= 0, got {self.freq_penalty}")
        if any(b < 1 for b in self.batch_sizes):
            raise EvalError(f"batch sizes must be >= 1, got {self.batch_sizes}")


def _find_dataset(config: EvalConfig, teacher_config: dict, student_config: dict,
                  tokenizer: Optional[Tokenizer]) -> TokenDataset:
    fingerprint = tokenizer.fingerprint() if tokenizer is not None else None
    if config.data_dir:  # given explicitly: that cache or an error
        meta = Path(config.data_dir) / "meta.json"
        found = json.loads(meta.read_text()).get("tokenizer_fingerprint") if meta.is_file() else None
        if found is None or (fingerprint is not None and found != fingerprint):
            raise EvalError(f"--data-dir {config.data_dir} holds no token cache made with the teacher's tokenizer")
        return TokenDataset(config.data_dir, verify=False)
    candidates = []
    for path in (config.student, config.teacher):
        path = Path(path).expanduser()
        candidates += [path / "data", path.parent / "data", path.parent.parent / "data",
                       path.parent.parent.parent / "data"]
    train = teacher_config.get("extra", {}).get("train", {})
    if train.get("data_dir"):
        candidates.append(Path(train["data_dir"]))
    if student_config.get("extra", {}).get("data_dir"):  # the cache the student was distilled on
        candidates.insert(0, Path(student_config["extra"]["data_dir"]))
    for candidate in candidates:
        meta = candidate / "meta.json"
        if not meta.is_file():
            continue
        try:
            found = json.loads(meta.read_text()).get("tokenizer_fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if fingerprint is None or found == fingerprint:
            return TokenDataset(candidate, verify=False)
    raise EvalError("cannot find held-out data made with the teacher's tokenizer next to the teacher or student; "
                    "pass --data-dir (a token cache, e.g. the teacher run's data/ directory)")


def _device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("device 'cuda' was requested but no CUDA GPU is visible")
    return device


def default_ks(max_k: int) -> List[int]:
    """1, 2, 4, ... up to max_k, and max_k itself."""
    ks, k = [], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k]


def run_eval(config: EvalConfig) -> Dict:
    """Run the whole evaluation; returns the results dict and writes eval.json / eval.md / plots to out_dir."""
    from tqdm import tqdm

    config.validate()
    device = _device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    teacher, tokenizer, teacher_config = ckpt.load_model(config.teacher, device=device)
    student, student_tokenizer, student_config = ckpt.load_model(config.student, device=device)
    if not isinstance(teacher, ARModel):
        raise EvalError(f"--teacher {config.teacher} is a {type(teacher).__name__}; it must be the AR teacher")
    if not isinstance(student, PushForwardLM):
        raise EvalError(f"--student {config.student} is an AR model; it must be a K-Forcing student "
                        "(a `kforcing distill` output)")
    check_compatible(teacher, student, tokenizer, student_tokenizer)
    reference = reference_tokenizer = None
    if config.reference:
        reference, reference_tokenizer, _ = ckpt.load_model(config.reference, device=device)
        if not isinstance(reference, ARModel):
            raise EvalError(f"--reference {config.reference} must be an AR model")
        if reference.config.vocab_size != teacher.config.vocab_size and (reference_tokenizer is None
                                                                         or tokenizer is None):
            raise EvalError("the reference model has another vocabulary and no tokenizer to re-tokenise samples with")
    ks = config.ks or default_ks(student.max_k)
    for k in ks:
        if not 1 <= k <= student.max_k:
            raise EvalError(f"--k {k} is not allowed: the student decodes 1 <= k <= max_k={student.max_k}")
    dataset = _find_dataset(config, teacher_config, student_config, tokenizer or student_tokenizer)
    if dataset.vocab_size > teacher.config.vocab_size:
        raise EvalError(f"the held-out data has {dataset.vocab_size} token ids but the models only "
                        f"{teacher.config.vocab_size}: it was made with another tokenizer")
    max_seq = teacher.config.max_seq_len
    trained_len = trained_context_length(teacher_config, student_config)
    context_len = min(config.context_len or trained_len or max_seq, max_seq - max(ks))
    eos = tokenizer.eos_id if tokenizer is not None else 0
    if config.prompt_len:
        prompts = heldout_contexts(dataset, config.num_samples, config.prompt_len, config.prompt_len,
                                   seed=config.seed + 1)
    else:
        prompts = [[eos] for _ in range(config.num_samples)]
    if len(prompts[0]) + config.sample_len > max_seq:
        raise EvalError(f"prompt ({len(prompts[0])}) + sample_len ({config.sample_len}) exceeds the models' "
                        f"max_seq_len={max_seq}")

    notes = []
    if trained_len and len(prompts[0]) + config.sample_len > trained_len + 1:
        notes.append(f"samples reach position {len(prompts[0]) + config.sample_len - 1}, beyond the "
                     f"{trained_len}-token contexts the student was distilled on")
    results = {"teacher": str(ckpt.resolve_checkpoint(config.teacher)), "notes": notes, "context_len": context_len,
               "student": str(ckpt.resolve_checkpoint(config.student)),
               "reference": str(ckpt.resolve_checkpoint(config.reference)) if config.reference else None,
               "student_max_k": student.max_k, "ks": ks, "settings": _settings(config),
               "teacher_params": teacher.num_params(), "student_params": student.num_params(),
               "machine": machine_info(device), "training": _training_budget(teacher_config, student_config)}
    penalties = [0.0] + ([config.freq_penalty] if config.freq_penalty else [])
    sample_sets = 1 + len(ks) * len(penalties)
    speed_units = len(config.batch_sizes) * config.speed_repeats
    bar = tqdm(total=len(ks) + sample_sets + speed_units, desc="eval", unit="task", disable=not config.progress,
               dynamic_ncols=True)

    # 1. Coupled agreement.
    contexts = heldout_contexts(dataset, config.contexts, context_len, seed=config.seed)
    results["agreement"] = []
    for k in ks:
        bar.set_postfix_str(f"agreement k={k}")
        result = coupled_agreement(teacher, student, contexts, k, seed=config.seed, temperature=config.temperature,
                                   batch_size=config.batch_size)
        results["agreement"].append(result)
        bar.update(1)

    # 2. Sample quality.
    results["quality"] = []
    bar.set_postfix_str("samples AR")
    start = time.perf_counter()
    ar_samples = generate_samples(teacher, prompts, config.sample_len, seed=config.seed,
                                  temperature=config.temperature, batch_size=config.batch_size)
    row = {"model": "AR teacher", "k": 0, "freq_penalty": 0.0, "seconds": time.perf_counter() - start,
           **sample_quality(ar_samples, prompts, teacher, reference, tokenizer, reference_tokenizer,
                            config.batch_size)}
    results["quality"].append(row)
    examples = {"AR teacher": ar_samples[0]}
    bar.update(1)
    for penalty in penalties:
        for k in ks:
            bar.set_postfix_str(f"samples k={k}" + (f" penalty {penalty:g}" if penalty else ""))
            start = time.perf_counter()
            samples = generate_samples(student, prompts, config.sample_len, seed=config.seed,
                                       temperature=config.temperature, k=k, freq_penalty=penalty,
                                       batch_size=config.batch_size)
            row = {"model": "student", "k": k, "freq_penalty": penalty, "seconds": time.perf_counter() - start,
                   **sample_quality(samples, prompts, teacher, reference, tokenizer, reference_tokenizer,
                                    config.batch_size)}
            # Coupling on free-running samples: how many tokens equal the AR sample of the same seed.
            row["token_match_with_ar"] = statistics.fmean(
                sum(a == b for a, b in zip(s, t)) / len(s) for s, t in zip(samples, ar_samples))
            row["prefix_match_with_ar"] = statistics.fmean(_common_prefix(s, t) for s, t in zip(samples, ar_samples))
            results["quality"].append(row)
            examples[f"student k={k}" + (f", penalty {penalty:g}" if penalty else "")] = samples[0]
            bar.update(1)
    if tokenizer is not None:
        results["examples"] = {name: tokenizer.decode(tokens) for name, tokens in examples.items()}

    # 3. Decode speed.
    results["speed"] = []
    if config.batch_sizes:
        bar.set_postfix_str("decode speed")
        speed_prompts = heldout_contexts(dataset, max(config.batch_sizes), 16, 16, seed=config.seed + 2)
        tokens = min(config.speed_tokens, max_seq - 16)
        results["speed"] = decode_speed(teacher, student, ks, config.batch_sizes, speed_prompts, tokens,
                                        config.speed_repeats, progress=bar)
        results["speed_tokens"] = tokens
    bar.close()
    results["targets"] = check_targets(results)
    if config.out_dir:
        write_report(results, config.out_dir, plots=config.plots)
    return results


def trained_context_length(teacher_config: dict, student_config: dict) -> Optional[int]:
    """The context length the student was distilled on (else the teacher's training length, else None).

    Held-out contexts default to it: a model's hint rows have not learned positions beyond it.
    """
    extra = student_config.get("extra", {})
    for value in (extra.get("summary", {}).get("seq_len"), extra.get("distill", {}).get("seq_len"),
                  teacher_config.get("extra", {}).get("train", {}).get("seq_len")):
        if value:
            return int(value)
    return None


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _settings(config: EvalConfig):
    data = dataclasses.asdict(config)
    return {key: value for key, value in data.items() if key not in ("progress",)}


def _training_budget(teacher_config: dict, student_config: dict) -> Dict:
    """What the teacher and the student were trained with, from their checkpoints' metadata."""
    budget = {}
    train = teacher_config.get("extra", {}).get("train")
    if train:
        budget["teacher"] = {key: train.get(key) for key in ("preset", "steps", "batch_size", "grad_accum",
                                                             "seq_len", "corpus", "corpus_max_bytes")}
        budget["teacher"]["step"] = teacher_config.get("extra", {}).get("step")
    extra = student_config.get("extra", {})
    if "distill" in extra:
        distill = extra["distill"]
        budget["student"] = {key: distill.get(key) for key in ("schedule", "objective", "steps", "batch_size",
                                                               "grad_accum", "seq_len", "tau")}
        summary = extra.get("summary", {})
        budget["student"]["final_stage"] = {key: summary.get(key) for key in ("k", "step", "tokens", "windows",
                                                                              "seq_len", "global_batch")}
    return budget


def machine_info(device) -> Dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def check_targets(results: Dict) -> Dict:
    """The quality targets of issue 6 at the largest evaluated k, each with its value and reached True/False."""
    k = max(results["ks"])
    agreement = next(a for a in results["agreement"] if a["k"] == k)
    teacher = next(q for q in results["quality"] if q["k"] == 0)
    student = next(q for q in results["quality"] if q["k"] == k and q["freq_penalty"] == 0.0)
    targets = {"k": k}
    targets["agree_offset_1"] = {"value": agreement["per_offset"][0], "target": f">= {TARGETS['agree_offset_1']}",
                                 "reached": agreement["per_offset"][0] >= TARGETS["agree_offset_1"]}
    if k >= 4:
        value = agreement["per_offset"][3]
        targets["agree_offset_4"] = {"value": value, "target": f">= {TARGETS['agree_offset_4']}",
                                     "reached": value >= TARGETS["agree_offset_4"]}
    ratio = student["ppl_teacher"] / teacher["ppl_teacher"]
    targets["ppl_ratio"] = {"value": ratio, "target": f"<= {TARGETS['ppl_ratio']}",
                            "reached": ratio <= TARGETS["ppl_ratio"]}
    rel = abs(student["unigram_entropy"] - teacher["unigram_entropy"]) / max(teacher["unigram_entropy"], 1e-12)
    targets["entropy_rel"] = {"value": rel, "target": f"<= {TARGETS['entropy_rel']}",
                              "reached": rel <= TARGETS["entropy_rel"]}
    # The sample-quality target is both at once: a low perplexity bought with repetitive, low-entropy text (a
    # collapsed student) does not count.
    targets["sample_quality"] = {"value": f"PPL ratio {ratio:.2f}, entropy gap {rel:.1%}",
                                 "target": f"PPL ratio <= {TARGETS['ppl_ratio']} at entropy gap <= "
                                           f"{TARGETS['entropy_rel']:.0%}",
                                 "reached": targets["ppl_ratio"]["reached"] and targets["entropy_rel"]["reached"]}
    return targets


# ---------------------------------------------------------------------------------------------------------
# Report: JSON, Markdown, plots


def _fmt(value, digits=3):
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_tables(results: Dict) -> str:
    """The Markdown tables of an evaluation (agreement, sample quality, decode speed, targets)."""
    lines = []
    max_k = max(results["ks"])
    lines.append("### Coupled agreement with the AR teacher (same contexts, same u)\n")
    lines.append(f"{results['agreement'][0]['windows']} held-out contexts per k (up to {results.get('context_len')} "
                 "tokens). Offset j: the share of windows whose j-th token equals the teacher's; exact: all k tokens "
                 "equal.\n")
    header = "| k | " + " | ".join(f"offset {j}" for j in range(1, max_k + 1)) + " | exact match |"
    lines += [header, "|" + "---|" * (max_k + 2)]
    for a in results["agreement"]:
        cells = [_fmt(v) for v in a["per_offset"]] + [""] * (max_k - a["k"])
        lines.append(f"| {a['k']} | " + " | ".join(cells) + f" | {_fmt(a['exact_match'])} |")
    has_ref = any("ppl_reference" in q for q in results["quality"])
    lines.append("\n### Sample quality\n")
    settings = results["settings"]
    prompt = "unconditional (EOS prompt)" if not settings["prompt_len"] else f"{settings['prompt_len']}-token prompts"
    lines.append(f"{settings['num_samples']} samples of {settings['sample_len']} tokens, {prompt}, temperature "
                 f"{settings['temperature']:g}, the same seeds for every row. Entropy in nats; "
                 "'match AR': share of tokens equal to the AR sample of the same seed.\n")
    cols = ["model", "k", "freq. penalty", "PPL (teacher)"] + (["PPL (reference)"] if has_ref else []) + [
        "unigram entropy", "distinct-2", "distinct-3", "longest repeat (mean / max)", "match AR"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for q in results["quality"]:
        cells = [q["model"], str(q["k"]) if q["k"] else "-", _fmt(q["freq_penalty"], 2) if q["k"] else "-",
                 _fmt(q["ppl_teacher"], 2)] + ([_fmt(q.get("ppl_reference", float("nan")), 2)] if has_ref else []) + [
            _fmt(q["unigram_entropy"]), _fmt(q["distinct_2"]), _fmt(q["distinct_3"]),
            f"{q['longest_repeat_mean']:.1f} / {q['longest_repeat_max']}",
            _fmt(q["token_match_with_ar"]) if "token_match_with_ar" in q else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for note in results.get("notes", []):
        lines.append(f"\nNote: {note}.")
    if results.get("speed"):
        machine = results["machine"]
        lines.append("\n### Decode speed\n")
        lines.append(f"{results['speed_tokens']} new tokens after 16-token prompts, {machine['device']} "
                     f"({machine['cpu_threads']} threads), medians of {settings['speed_repeats']} interleaved "
                     "rounds; speedup = median per-round AR time / this time.\n")
        lines += ["| batch | decoder | passes | tokens/s | ms/pass | speedup vs AR |", "|---|---|---|---|---|---|"]
        for s in results["speed"]:
            lines.append(f"| {s['batch']} | {s['decoder']} | {s['passes']} | {s['tokens_per_s']:.0f} | "
                         f"{s['ms_per_pass']:.2f} | {s['speedup']:.2f}x |")
    targets = results.get("targets")
    if targets:
        lines.append(f"\n### Quality targets (issue 6) at k={targets['k']}, no frequency penalty\n")
        lines += ["| target | value | goal | reached |", "|---|---|---|---|"]
        names = {"agree_offset_1": "agreement at offset 1", "agree_offset_4": "agreement at offset 4",
                 "ppl_ratio": "PPL(student) / PPL(AR samples), under the teacher",
                 "entropy_rel": "relative entropy gap, abs(H(student) - H(AR)) / H(AR)",
                 "sample_quality": "sample quality (both of the above)"}
        for key, name in names.items():
            if key in targets:
                t = targets[key]
                value = f"{t['value']:.3f}" if isinstance(t["value"], float) else t["value"]
                lines.append(f"| {name} | {value} | {t['target']} | {'yes' if t['reached'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_report(results: Dict, out_dir, plots: bool = True) -> Dict[str, str]:
    """Write eval.json, eval.md and (plots=True) quality_vs_k.png, agreement.png, throughput.png; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    md = ["# K-Forcing evaluation\n", f"Teacher: `{results['teacher']}`  ", f"Student: `{results['student']}` "
          f"(max_k={results['student_max_k']})\n", markdown_tables(results)]
    if plots:
        for name, path in plot_results(results, out).items():
            paths[name] = path
            md.append(f"\n![{name}]({path.name})\n")
    paths["markdown"].write_text("".join(md))
    return {key: str(value) for key, value in paths.items()}


def plot_results(results: Dict, out: Path) -> Dict[str, Path]:
    """PNG plots with matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = {}
    ks = results["ks"]
    teacher = next(q for q in results["quality"] if q["k"] == 0)
    # Quality vs k.
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("ppl_teacher", "unigram_entropy", "distinct_3"),
                              ("perplexity under the teacher", "unigram entropy (nats)", "distinct-3")):
        for penalty in sorted({q["freq_penalty"] for q in results["quality"] if q["k"]}):
            rows = [q for q in results["quality"] if q["k"] and q["freq_penalty"] == penalty]
            ax.plot([q["k"] for q in rows], [q[key] for q in rows], "o-",
                    label="student" + (f", penalty {penalty:g}" if penalty else ""))
        ax.axhline(teacher[key], color="k", linestyle="--", label="AR teacher")
        ax.set_xlabel("k (tokens per pass)")
        ax.set_xticks(ks)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths["quality_vs_k"] = out / "quality_vs_k.png"
    fig.savefig(paths["quality_vs_k"], dpi=110)
    plt.close(fig)
    # Agreement per offset.
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for a in results["agreement"]:
        ax.plot(range(1, a["k"] + 1), a["per_offset"], "o-", label=f"k={a['k']} (exact {a['exact_match']:.2f})")
    ax.set_xlabel("offset in the window")
    ax.set_ylabel("agreement with the AR teacher")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, max(ks) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("coupled agreement (same u)")
    fig.tight_layout()
    paths["agreement"] = out / "agreement.png"
    fig.savefig(paths["agreement"], dpi=110)
    plt.close(fig)
    # Throughput vs batch size.
    if results.get("speed"):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name in dict.fromkeys(s["decoder"] for s in results["speed"]):
            rows = [s for s in results["speed"] if s["decoder"] == name]
            ax.plot([s["batch"] for s in rows], [s["tokens_per_s"] for s in rows], "o-",
                    label="AR" if name == "AR" else f"K-Forcing {name}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"decode throughput ({results['machine']['device']})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["throughput"] = out / "throughput.png"
        fig.savefig(paths["throughput"], dpi=110)
        plt.close(fig)
    return paths


__all__ = ["EvalConfig", "EvalError", "TARGETS", "agreement_from_tokens", "check_compatible", "check_targets",
           "coupled_agreement", "decode_speed", "default_ks", "distinct_n", "generate_samples", "heldout_contexts",
           "longest_repeated_ngram", "markdown_tables", "perplexity", "plot_results", "run_eval", "sample_quality",
           "text_statistics", "unigram_entropy", "window_tokens", "write_report"]
