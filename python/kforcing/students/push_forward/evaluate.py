"""Evaluation of a push-forward student against its AR teacher (`kforcing eval`, docs/method.md §6).

Three measurements, each for every k the student decodes with (any k <= its max_k):

Coupled agreement. Held-out contexts x (prefixes of the validation split, of varied lengths). For each context
and k, the teacher samples its next k tokens sequentially by inverse CDF (`generate_ar`) and the student emits k
tokens in one pass (`generate_kforcing`), both from the same uniforms u(seed, context index, position). Reported:
the fraction of windows in which the student's j-th token equals the teacher's j-th token (per offset j), and the
whole-window exact match. Only a push-forward model can be measured like this: it is a function of u.

Sample quality. N samples of L tokens from the same prompts and seeds, from the AR teacher and from the student at
each k, without and with the frequency penalty (the AR teacher has none), scored by
`kforcing.evaluation.metrics.sample_quality`.

Decode speed. Tokens/s of whole generate calls, AR vs the student at each k, same backbone, machine and run,
across batch sizes; interleaved rounds, medians, and the per-round speedup over AR.

The quality targets (`TARGETS`) are checked for the largest k evaluated and stated as reached or not.
"""

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from ...data import heldout_contexts
from ...decoding.generate import generate_ar, generate_kforcing
from ...evaluation.metrics import (EvalError, agreement_from_tokens, check_compatible, common_prefix, sample_quality,
                                   time_interleaved)
from ...models.transformer import ARModel, Transformer
from ...teachers.protocol import is_teacher
from .model import PushForwardLM

DEFAULT_FREQ_PENALTY = 1.0  # the penalised sample set beside the plain one
# Quality targets, measured at the largest k without frequency penalty.
TARGETS = {"agree_offset_1": 0.90, "agree_offset_4": 0.75, "ppl_ratio": 1.3, "entropy_rel": 0.05}


# ---------------------------------------------------------------------------------------------------------
# Measurements


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


# ---------------------------------------------------------------------------------------------------------
# The evaluation


def _quality(config, models, prompts, ks, bar) -> Dict:
    """{"quality": one row per sample set (AR teacher, then the student per penalty and k), "examples"}."""
    penalty = DEFAULT_FREQ_PENALTY if config.freq_penalty is None else config.freq_penalty
    penalties = [0.0] + ([penalty] if penalty else [])
    rows, examples, ar_samples = [], {}, None

    def measure(name, model, k, penalty):
        start = time.perf_counter()
        samples = generate_samples(model, prompts, config.sample_len, seed=config.seed, temperature=config.temperature,
                                   k=k, freq_penalty=penalty, batch_size=config.batch_size)
        row = {"model": name, "k": k or 0, "freq_penalty": penalty, "seconds": time.perf_counter() - start,
               **sample_quality(samples, prompts, models.teacher, models.reference, models.tokenizer,
                                models.reference_tokenizer, config.batch_size)}
        rows.append(row)
        bar.update(1)
        return samples, row

    bar.set_postfix_str("samples AR")
    ar_samples, _ = measure("AR teacher", models.teacher, None, 0.0)
    examples["AR teacher"] = ar_samples[0]
    for penalty in penalties:
        for k in ks:
            bar.set_postfix_str(f"samples k={k}" + (f" penalty {penalty:g}" if penalty else ""))
            samples, row = measure("student", models.student, k, penalty)
            # Coupling on free-running samples: how many tokens equal the AR sample of the same seed.
            row["token_match_with_ar"] = statistics.fmean(
                sum(a == b for a, b in zip(s, t)) / len(s) for s, t in zip(samples, ar_samples))
            row["prefix_match_with_ar"] = statistics.fmean(common_prefix(s, t) for s, t in zip(samples, ar_samples))
            examples[f"student k={k}" + (f", penalty {penalty:g}" if penalty else "")] = samples[0]
    result = {"quality": rows}
    if models.tokenizer is not None:
        result["examples"] = {name: models.tokenizer.decode(tokens) for name, tokens in examples.items()}
    return result


def evaluate_push_forward(config, models, dataset, prompts, results: Dict) -> Dict:
    """The agreement, sample quality and decode speed of a push-forward student (`models.student`), into
    `results` (`kforcing.workflows.evaluate.run_eval` made its common part)."""
    from tqdm import tqdm

    ks = results["ks"]
    sample_sets = 1 + len(ks) * (1 if config.freq_penalty == 0 else 2)
    bar = tqdm(total=len(ks) + sample_sets + len(config.batch_sizes) * config.speed_repeats, desc="eval",
               unit="task", disable=not config.progress, dynamic_ncols=True)
    contexts = heldout_contexts(dataset, config.contexts, results["context_len"], seed=config.seed)
    results["agreement"] = []
    for k in ks:
        bar.set_postfix_str(f"agreement k={k}")
        results["agreement"].append(coupled_agreement(models.teacher, models.student, contexts, k, seed=config.seed,
                                                      temperature=config.temperature, batch_size=config.batch_size))
        bar.update(1)
    results.update(_quality(config, models, prompts, ks, bar))
    results["speed"] = []
    if config.batch_sizes:
        bar.set_postfix_str("decode speed")
        speed_prompts = heldout_contexts(dataset, max(config.batch_sizes), 16, 16, seed=config.seed + 2)
        results["speed_tokens"] = min(config.speed_tokens, models.teacher.config.max_seq_len - 16)
        results["speed"] = decode_speed(models.teacher, models.student, ks, config.batch_sizes, speed_prompts,
                                        results["speed_tokens"], config.speed_repeats, progress=bar,
                                        compile=config.compile)
    bar.close()
    results["targets"] = check_targets(results)
    return results


def check_targets(results: Dict) -> Dict:
    """The quality targets (`TARGETS`) at the largest evaluated k, each with its value and reached True/False."""
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


__all__ = ["DEFAULT_FREQ_PENALTY", "TARGETS", "check_targets", "coupled_agreement", "decode_speed",
           "evaluate_push_forward", "generate_samples", "window_tokens"]
