"""Evaluation of a draft student (`kforcing eval` when --student is a `distill --pathway head|trunk|chain` output).

A draft student's token rows are its teacher's, so there is no agreement to measure on them: verified decoding
reproduces the teacher exactly, and what matters is how many tokens each pass earns and whether the drafts carry
what the uniforms say. All of it at one sampling setting (temperature, top-k, top-p: the one the head learned):

Verified decoding. Held-out prompts decode `sample_len` tokens with `generate_with_drafts(verify=True)` at every
k: tokens per pass, the share of verification steps in which drafts 2..j were all accepted (per draft offset j),
and a check that the output equals AR sampling (`generate_ar`, same seeds) token for token.

Diagnostics, at the largest k:
    floor     the acceptance of a u-blind drafter: drafts 2..k sampled from the teacher's exact distribution given
              the context and y1 with independent uniforms (a sample of the teacher's multi-step mixture). A head
              that learned the mixture but not the map from u reaches about this.
    shuffle   verified decoding with the hint rows' uniforms drawn from another seed (`hint_seed`), the teacher's
              and a categorical readout's sampling uniforms unchanged. A head that ignores u loses nothing here.
              (Not for a chain student: it has no hint rows.)

Unverified samples. The same prompts decoded with verify=False (k tokens per pass, the head's own drafts) against
the teacher's AR samples at the same settings: perplexity under the teacher, unigram entropy, distinct n-grams,
longest repeated n-gram (`kforcing.evaluation.metrics.sample_quality`), and the share of tokens equal to the AR sample.

Decode speed. Tokens/s of whole calls, AR vs verified vs unverified decoding at each batch size, interleaved rounds
(`kforcing.evaluation.metrics.time_interleaved`); speedup = median per-round AR time / this time.
"""

import statistics
from typing import Dict, List

import torch

from ...data import heldout_contexts
from ...decoding.generate import generate_ar
from ...evaluation.metrics import common_prefix, sample_quality, time_interleaved
from .decode import generate_with_drafts
from .student import DraftStudent, Sampling

DRAFT_TARGETS = {"entropy_rel": 0.05, "ppl_ratio": 1.3, "repeat_ratio": 2.0}
_FLOOR_SEED_KEY = 0x5EED_F100  # the u-blind drafter's own noise stream
_SHUFFLE_SEED_KEY = 0x5EED_5AFF  # the u-shuffle test's hint uniforms


def _in_batches(fn, prompts, batch_size) -> List:
    """fn(chunk, sequence ids) over consecutive chunks: sequence i keeps noise stream i whatever the batching."""
    return [fn(prompts[first:first + batch_size], list(range(first, min(first + batch_size, len(prompts)))))
            for first in range(0, len(prompts), batch_size)]


def ar_samples(teacher, prompts, length, seed, sampling: Sampling, batch_size) -> List[List[int]]:
    outs = _in_batches(lambda chunk, ids: generate_ar(teacher, chunk, length, seed=seed, **vars(sampling),
                                                      sequence_ids=ids), prompts, batch_size)
    return [row for out in outs for row in out.tokens.cpu().tolist()]


def draft_decoding(student: DraftStudent, prompts, length, k, seed, sampling: Sampling, batch_size,
                   verify=True, hint_seed=None) -> Dict:
    """{"samples", "tokens_per_pass", "accepted" (per draft offset)} of `generate_with_drafts` over all prompts."""
    outs = _in_batches(lambda chunk, ids: generate_with_drafts(
        student, chunk, length, k=k, seed=seed, **vars(sampling), verify=verify, sequence_ids=ids,
        hint_seed=hint_seed), prompts, batch_size)
    weights = [len(out.lengths) for out in outs]
    result = {"samples": [row for out in outs for row in out.tokens.cpu().tolist()],
              "tokens_per_pass": sum(w * out.tokens_per_pass for w, out in zip(weights, outs)) / sum(weights)}
    if verify and k is not None:  # adaptive rounds (k None) draft different numbers of tokens: no per-offset rate
        result["accepted"] = [sum(w * out.accepted[j] for w, out in zip(weights, outs)) / sum(weights)
                              for j in range(k - 1)]
    return result


def ublind_floor(teacher, prompts, k, seed, sampling: Sampling, batch_size) -> List[float]:
    """Acceptance per draft offset 2..k of drafts sampled from the teacher given (context, y1) with independent
    uniforms (see the module docstring)."""
    truth = ar_samples(teacher, prompts, k, seed, sampling, batch_size)
    extended = [prompt + [tokens[0]] for prompt, tokens in zip(prompts, truth)]
    drafts = ar_samples(teacher, extended, k - 1, seed ^ _FLOOR_SEED_KEY, sampling, batch_size)
    accepted = torch.tensor([[d == t for d, t in zip(draft, tokens[1:])] for draft, tokens in zip(drafts, truth)])
    return accepted.long().cumprod(dim=1).double().mean(dim=0).tolist()


def verified_rows(student, prompts, ks, length, seed, sampling, batch_size, reference) -> List[Dict]:
    """Verified decoding at every k; `reference` are the AR samples the outputs must equal."""
    rows = []
    for k in ks:
        decoded = draft_decoding(student, prompts, length, k, seed, sampling, batch_size)
        rows.append({"k": k, "tokens_per_pass": decoded["tokens_per_pass"], "accepted": decoded["accepted"],
                     "equals_ar": decoded["samples"] == reference})
    return rows


def adaptive_row(student, prompts, length, seed, sampling, batch_size, reference) -> Dict:
    """Verified decoding with adaptive drafting (k=None, the default of `kforcing sample --verify`): its tokens per
    round and whether its output equals the AR samples `reference`."""
    decoded = draft_decoding(student, prompts, length, None, seed, sampling, batch_size)
    return {"tokens_per_pass": decoded["tokens_per_pass"], "equals_ar": decoded["samples"] == reference}


def diagnostics(student, prompts, k, length, seed, sampling, batch_size, floor_contexts=None) -> Dict:
    """The u-blind floor and the u-shuffle test at k (see the module docstring).

    The shuffle test decodes `length` tokens from every prompt (many windows each); the floor has one window per
    context, so it is measured on `floor_contexts` (default: the prompts), which should be many.
    """
    shuffled = {"accepted": None, "tokens_per_pass": None}  # a chain student has no hint rows to shuffle
    if student.pathway != "chain":
        shuffled = draft_decoding(student, prompts, length, k, seed, sampling, batch_size,
                                  hint_seed=seed ^ _SHUFFLE_SEED_KEY)
    floor = ublind_floor(student.teacher, floor_contexts or prompts, k, seed, sampling, batch_size)
    return {"k": k, "floor": floor, "floor_windows": len(floor_contexts or prompts),
            "shuffle": shuffled["accepted"], "shuffle_tokens_per_pass": shuffled["tokens_per_pass"]}


def unverified_quality(student, prompts, ks, length, seed, sampling, batch_size, reference, models):
    """(rows, first samples): the sample quality of the teacher's AR samples (`reference`) and of unverified decoding
    at every k, and the first sample of each set ({"AR teacher (= verified)": tokens, "unverified k=K": tokens})."""
    def quality(samples):
        return sample_quality(samples, prompts, student.teacher, models.reference, models.tokenizer,
                              models.reference_tokenizer, batch_size)

    rows = [{"model": "AR teacher", "k": 0, "freq_penalty": 0.0, **quality(reference)}]
    first = {"AR teacher (= verified)": reference[0]}
    for k in ks:
        samples = draft_decoding(student, prompts, length, k, seed, sampling, batch_size, verify=False)["samples"]
        first[f"unverified k={k}"] = samples[0]
        rows.append({"model": "draft, unverified", "k": k, "freq_penalty": 0.0, **quality(samples),
                     "token_match_with_ar": statistics.fmean(
                         sum(a == b for a, b in zip(s, t)) / len(s) for s, t in zip(samples, reference)),
                     "prefix_match_with_ar": statistics.fmean(common_prefix(s, t) for s, t in zip(samples, reference))})
    return rows, first


def draft_speed(student, ks, batch_sizes, prompts, new_tokens, repeats, seed, sampling, progress=None,
                compile: bool = False) -> List[Dict]:
    """Tokens/s of AR, verified (each k, and adaptive) and unverified decoding per batch size (rows as
    `kforcing.evaluation.metrics.decode_speed`; "verified adaptive" drafts up to max_k - 1 tokens a round, or none).
    compile: every decoder compiled (`generate_ar(compile=True)`, `generate_with_drafts(compile=True)`); before the
    timed rounds, a call at every k compiles each draft count adaptive drafting may choose."""
    rows = []
    options = dict(vars(sampling), compile=compile)
    for batch in batch_sizes:
        chunk = prompts[:batch]
        if compile:
            for k in range(2, student.max_k + 1):
                generate_with_drafts(student, chunk, new_tokens, k=k, seed=seed, **options)
        runs = {"AR": lambda: generate_ar(student.teacher, chunk, new_tokens, seed=seed, **options)}
        row_k = {"AR": 0, "verified adaptive": student.max_k}
        for k in ks:
            for verify in (True, False):
                name = f"{'verified' if verify else 'unverified'} k={k}"
                row_k[name] = k
                runs[name] = (lambda k=k, verify=verify: generate_with_drafts(
                    student, chunk, new_tokens, k=k, seed=seed, **options, verify=verify))
        runs["verified adaptive"] = lambda: generate_with_drafts(student, chunk, new_tokens, seed=seed, **options)
        measured = time_interleaved(runs, student.device, repeats, progress)
        for name, (times, out) in measured.items():
            seconds = statistics.median(times)
            rows.append({"batch": batch, "decoder": name, "k": row_k[name],
                         "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "passes": out.num_passes,
                         "ms_per_pass": 1e3 * seconds / out.num_passes,
                         "speedup": statistics.median(a / b for a, b in zip(measured["AR"][0], times))})
    return rows


def check_draft_targets(results: Dict) -> Dict:
    """Offset-2 acceptance above the u-blind floor, and the unverified samples' quality against the teacher's, at
    the largest k; the tokens per pass are reported beside them (their target depends on the budget)."""
    k = max(results["ks"])
    verified = next(v for v in results["verified"] if v["k"] == k)
    teacher = next(q for q in results["quality"] if q["k"] == 0)
    student = next(q for q in results["quality"] if q["k"] == k)
    floor = results["diagnostics"]["floor"][0]
    entropy = abs(student["unigram_entropy"] - teacher["unigram_entropy"]) / max(teacher["unigram_entropy"], 1e-12)
    ppl = student["ppl_teacher"] / teacher["ppl_teacher"]
    repeat = student["longest_repeat_mean"] / max(teacher["longest_repeat_mean"], 1e-12)
    exact = all(v["equals_ar"] for v in results["verified"]) and (results.get("verified_adaptive") or {}).get(
        "equals_ar", True)
    return {"k": k,
            "tokens_per_pass": {"value": verified["tokens_per_pass"], "target": "reported", "reached": True},
            "exact": {"value": str(exact), "target": "verified (pinned k and adaptive) == AR", "reached": exact},
            "accept_2_floor": {"value": f"{verified['accepted'][0]:.3f} vs floor {floor:.3f}", "target": "> floor",
                               "reached": verified["accepted"][0] > floor},
            "entropy_rel": {"value": entropy, "target": f"<= {DRAFT_TARGETS['entropy_rel']}",
                            "reached": entropy <= DRAFT_TARGETS["entropy_rel"]},
            "ppl_ratio": {"value": ppl, "target": f"<= {DRAFT_TARGETS['ppl_ratio']}",
                          "reached": ppl <= DRAFT_TARGETS["ppl_ratio"]},
            "repeat_ratio": {"value": repeat, "target": f"<= {DRAFT_TARGETS['repeat_ratio']}",
                             "reached": repeat <= DRAFT_TARGETS["repeat_ratio"]}}


def evaluate_draft_student(config, models, dataset, prompts, results: Dict) -> Dict:
    """Every measurement of a draft student (`models.student`) above, into `results`
    (`kforcing.workflows.evaluate.run_eval` made its common part)."""
    from tqdm import tqdm

    student, ks = models.student, results["ks"]
    sampling = Sampling(config.temperature, config.top_k, config.top_p, config.cdf_order)
    common = dict(length=config.sample_len, seed=config.seed, sampling=sampling, batch_size=config.batch_size)
    results.update(kind="draft", head=student.head_config.to_dict(), sampling=vars(sampling))
    bar = tqdm(total=4 + len(config.batch_sizes) * config.speed_repeats, desc="eval", unit="task",
               disable=not config.progress, dynamic_ncols=True)
    bar.set_postfix_str("AR samples")
    reference = ar_samples(student.teacher, prompts, **common)
    bar.update(1)
    bar.set_postfix_str("verified decoding")
    results["verified"] = verified_rows(student, prompts, ks, reference=reference, **common)
    results["verified_adaptive"] = adaptive_row(student, prompts, reference=reference, **common)
    bar.update(1)
    bar.set_postfix_str("u-blind floor and u-shuffle")
    contexts = heldout_contexts(dataset, config.contexts, results["context_len"], seed=config.seed)
    results["diagnostics"] = diagnostics(student, prompts, max(ks), floor_contexts=contexts, **common)
    bar.update(1)
    bar.set_postfix_str("unverified samples")
    results["quality"], first = unverified_quality(student, prompts, ks, reference=reference,
                                                              models=models, **common)
    if models.tokenizer is not None:
        results["examples"] = {name: models.tokenizer.decode(tokens) for name, tokens in first.items()}
    bar.update(1)
    results["speed"] = []
    if config.batch_sizes:
        bar.set_postfix_str("decode speed")
        speed_prompts = heldout_contexts(dataset, max(config.batch_sizes), 16, 16, seed=config.seed + 2)
        results["speed_tokens"] = min(config.speed_tokens, student.config.max_seq_len - 16 - 2 * max(ks))
        results["speed"] = draft_speed(student, ks, config.batch_sizes, speed_prompts,
                                                  results["speed_tokens"], config.speed_repeats, config.seed,
                                                  sampling, progress=bar, compile=config.compile)
    bar.close()
    results["targets"] = check_draft_targets(results)
    return results


__all__ = ["DRAFT_TARGETS", "adaptive_row", "ar_samples", "check_draft_targets", "diagnostics", "draft_decoding",
           "draft_speed", "evaluate_draft_student", "ublind_floor", "unverified_quality", "verified_rows"]
