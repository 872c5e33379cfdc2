"""Evaluation of a K-Forcing student against its AR teacher (`kforcing eval`, docs/method.md §6).

    kforcing eval --teacher runs/teacher --student runs/student --k 1,2,4 --out runs/eval

Three measurements (`kforcing.evaluation.metrics`), each for every k the student decodes with (any k <= its max_k):

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

`run_eval` returns the results as data (a JSON-serialisable dict, saved as eval.json with `save_results`);
`kforcing.evaluation.report` turns them into Markdown tables and plots. The quality targets (`TARGETS`) are checked for
the largest k evaluated and stated as reached or not.
"""

import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import Provenance, RunLayout
from ..data import TokenDataset, find_token_cache, heldout_contexts
from . import evaluate_draft as draft_eval
from .metrics import (EvalError, check_compatible, common_prefix, coupled_agreement, decode_speed,
                      generate_samples, sample_quality)
from ..checkpoints.draft_checkpoint import trained_sampling
from ..checkpoints.loading import load_model
from ..models.transformer import ARModel
from ..options import option, parse_int_list
from ..runtime import machine_info, read_json, resolve_device, write_json_atomic
from ..students.draft_student import CDF_ORDERS, DraftStudent, Sampling
from ..students.push_forward import PushForwardLM
from ..teachers.hf_teacher import HFTeacher
from ..teachers.protocol import is_teacher

# Quality targets, measured at the largest k without frequency penalty.
DEFAULT_FREQ_PENALTY = 1.0  # push-forward students: the penalised sample set beside the plain one
EVAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = {"agree_offset_1": 0.90, "agree_offset_4": 0.75, "ppl_ratio": 1.3, "entropy_rel": 0.05}


@dataclasses.dataclass
class EvalConfig:
    """Settings of `kforcing eval`; each field's help is its flag's.

    teacher / student: checkpoint or run directories (a distill run resolves to its final student).
    context_len: the longest held-out context (default: the length the student was distilled on,
        `trained_context_length`, at most max_seq_len - max k).
    prompt_len 0 = unconditional samples (the prompt is the EOS token), > 0 = held-out prefixes of that length.
    data_dir: token cache for held-out data (default: the one the student or teacher was trained on, from their
        checkpoints' provenance).
    """

    teacher: str = option(help="the AR teacher (checkpoint or run directory, or hf:PATH for a Hugging Face model)",
                          required=True)
    student: str = option(help="the student (checkpoint, or a distill run directory)", required=True)
    out_dir: Optional[str] = option(None, "output directory (default: STUDENT/eval)", flag="--out")
    ks: Optional[List[int]] = option(None, "k values to evaluate, e.g. 1,2,4 (default: 1, 2, 4, .. max_k)",
                                     flag="--k", convert=lambda text: parse_int_list(text, "--k") if text else None)
    reference: Optional[str] = option(None, "an optional larger AR checkpoint to score samples with (another "
                                      "tokenizer is fine: samples are re-tokenised)")
    contexts: int = option(256, "held-out contexts for the coupled agreement")
    context_len: Optional[int] = option(None, "longest context (default: the distilled length, at most "
                                        "max_seq_len - max k)")
    num_samples: int = option(32, "samples per model and k")
    sample_len: int = option(128, "tokens per sample")
    prompt_len: int = option(0, "0: unconditional samples (EOS prompt); N: held-out prefixes of N tokens")
    temperature: Optional[float] = option(None, "sampling temperature (the student's tau; default: a draft "
                                          "student's own, else 1.0)")
    top_k: Optional[int] = option(None, "draft students: the top-k of the sampling distribution (0: off; default: "
                                  "the one it was distilled with)")
    top_p: Optional[float] = option(None, "draft students: the top-p of the sampling distribution (1: off; default: "
                                    "the one it was distilled with)")
    cdf_order: Optional[str] = option(None, "draft students: the inverse CDF's token order (vocab or descending; "
                                      "default: the one it was distilled with)", choices=list(CDF_ORDERS))
    freq_penalty: Optional[float] = option(None, "push-forward students: lambda of the penalised student samples "
                                           "(0: none; default 1.0)")
    batch_sizes: List[int] = option([1, 8, 32], "batch sizes of the decode benchmark ('' to skip it)",
                                    convert=lambda text: parse_int_list(text, "--batch-sizes") if text.strip() else [],
                                    flag_default="1,8,32")
    speed_tokens: int = option(64, "new tokens per benchmark call")
    speed_repeats: int = option(3, "interleaved benchmark rounds")
    batch_size: int = option(32, "sequences per generate call for agreement/samples")
    data_dir: Optional[str] = option(None, "token cache with a validation split (default: the one the student or "
                                     "teacher was trained on)")
    seed: int = option(0, "noise seed")
    device: str = option("auto", "cpu, cuda or auto")
    dtype: str = option("float32", "the models' dtype while evaluating (bfloat16 or float16: what a GPU serves); "
                        "checkpoints load in float32 and are cast once the student is matched to its teacher",
                        choices=list(EVAL_DTYPES))
    draft_weights: str = option("bfloat16", "draft students with --dtype float32: how the head's linear weights are "
                                "stored for drafting (chain and head pathways); bfloat16 halves the bytes drafting "
                                "reads, and verified output is unchanged", choices=["float32", "bfloat16"])
    threads: Optional[int] = option(None, "CPU threads (default: torch's)")
    plots: bool = option(True, "skip the PNG plots", flag="--no-plots", action="store_false")
    progress: bool = option(True, "hide the progress bar", flag="--no-progress", action="store_false")

    def validate(self):
        for name in ("contexts", "num_samples", "sample_len", "batch_size", "speed_tokens", "speed_repeats"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompt_len < 0:
            raise EvalError(f"prompt_len must be >= 0, got {self.prompt_len}")
        if self.temperature is not None and not 0.0 < self.temperature < math.inf:
            raise EvalError(f"temperature must be positive, got {self.temperature}")
        if (self.top_k is not None and self.top_k < 0) or (self.top_p is not None and not 0.0 < self.top_p <= 1.0):
            raise EvalError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")
        if self.freq_penalty is not None and self.freq_penalty < 0:
            raise EvalError(f"freq_penalty must be >= 0, got {self.freq_penalty}")
        if any(b < 1 for b in self.batch_sizes):
            raise EvalError(f"batch sizes must be >= 1, got {self.batch_sizes}")


@dataclasses.dataclass
class Models:
    """The checkpoints an evaluation compares, loaded, with what they were trained from."""

    teacher: Union[ARModel, HFTeacher]
    student: Union[PushForwardLM, DraftStudent]
    tokenizer: object
    teacher_provenance: Optional[Provenance]
    student_provenance: Optional[Provenance]
    reference: Optional[ARModel] = None
    reference_tokenizer: object = None


def load_models(config: EvalConfig, device) -> Models:
    """The teacher, the student and the optional reference, checked to be comparable, cast to config.dtype (after
    loading: a draft student checks its teacher's float32 weights against the fingerprint it was trained on)."""
    teacher, tokenizer, teacher_config = load_model(config.teacher, device=device)
    if not is_teacher(teacher):
        raise EvalError(f"--teacher {config.teacher} is a {type(teacher).__name__}; it must be the AR teacher")
    student, student_tokenizer, student_config = load_model(config.student, device=device, teacher=teacher)
    if isinstance(student, ARModel):
        raise EvalError(f"--student {config.student} is an AR model; it must be a K-Forcing student "
                        "(a `kforcing distill` output)")
    if isinstance(student, DraftStudent) and config.freq_penalty is not None:
        raise EvalError("--freq-penalty applies to push-forward students; a draft student's samples are never "
                        "penalised (verified decoding is the teacher's own sample)")
    if isinstance(student, PushForwardLM):
        check_compatible(teacher, student, tokenizer, student_tokenizer)
        if config.top_k or (config.top_p or 1.0) < 1.0 or config.cdf_order not in (None, "vocab"):
            raise EvalError("--top-k/--top-p/--cdf-order apply to draft students; a push-forward student samples "
                            "the full distribution at its temperature in vocabulary order")
    models = Models(teacher, student, tokenizer or student_tokenizer, Provenance.from_config(teacher_config),
                    Provenance.from_config(student_config))
    if config.reference:
        models.reference, models.reference_tokenizer, _ = load_model(config.reference, device=device)
        if not isinstance(models.reference, ARModel):
            raise EvalError(f"--reference {config.reference} must be an AR model")
        if models.reference.config.vocab_size != teacher.config.vocab_size and (
                models.reference_tokenizer is None or tokenizer is None):
            raise EvalError("the reference model has another vocabulary and no tokenizer to re-tokenise samples with")
    dtype = EVAL_DTYPES[config.dtype]
    for model in (models.teacher, models.student, models.reference):
        if model is not None:
            model.to(dtype)
    if isinstance(student, DraftStudent) and dtype == torch.float32:
        student.store_draft_weights(getattr(torch, config.draft_weights))
    return models


def heldout_data(config: EvalConfig, models: Models) -> TokenDataset:
    """The token cache of held-out data: --data-dir, else the one the student, then the teacher, was trained on
    (their checkpoints' provenance), else a teacher run's own data/ directory."""
    if config.data_dir:  # given explicitly: that cache or an error
        dataset = find_token_cache([config.data_dir], models.tokenizer)
        if dataset is None:
            raise EvalError(f"--data-dir {config.data_dir} holds no token cache made with the teacher's tokenizer")
        return dataset
    candidates = [p.token_cache for p in (models.student_provenance, models.teacher_provenance) if p is not None]
    dataset = find_token_cache(candidates + [RunLayout(Path(config.teacher).expanduser()).data], models.tokenizer)
    if dataset is None:
        raise EvalError("cannot find held-out data made with the teacher's tokenizer in the teacher's or student's "
                        "provenance; pass --data-dir (a token cache, e.g. the teacher run's data/ directory)")
    return dataset


def trained_context_length(models: Models) -> Optional[int]:
    """The context length the student was distilled on (else the teacher's training length, else None).

    Held-out contexts default to it: a model's hint rows have not learned positions beyond it.
    """
    for provenance in (models.student_provenance, models.teacher_provenance):
        if provenance is not None and provenance.seq_len:
            return int(provenance.seq_len)
    return None


def training_budget(models: Models) -> Dict:
    """What the teacher and the student were trained with, from their checkpoints' provenance."""
    budget = {}
    teacher, student = models.teacher_provenance, models.student_provenance
    if teacher is not None and teacher.stage == "teacher":
        budget["teacher"] = {key: teacher.settings.get(key) for key in ("preset", "steps", "batch_size", "grad_accum",
                                                                        "seq_len", "corpus", "corpus_max_bytes")}
        budget["teacher"]["step"] = teacher.step
    if student is not None and student.stage == "distill":
        budget["student"] = {key: student.settings.get(key) for key in ("schedule", "objective", "steps",
                                                                        "batch_size", "grad_accum", "seq_len", "tau")}
        budget["student"]["final_stage"] = {key: (student.summary or {}).get(key) for key in (
            "k", "step", "tokens", "windows", "seq_len", "global_batch")}
    return budget


def default_ks(max_k: int) -> List[int]:
    """1, 2, 4, ... up to max_k, and max_k itself."""
    ks, k = [], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k]


def _sample_prompts(config: EvalConfig, models: Models, dataset: TokenDataset) -> List[List[int]]:
    eos = models.tokenizer.eos_id if models.tokenizer is not None else 0
    if config.prompt_len:
        prompts = heldout_contexts(dataset, config.num_samples, config.prompt_len, config.prompt_len,
                                   seed=config.seed + 1)
    else:
        prompts = [[eos] for _ in range(config.num_samples)]
    max_seq = models.teacher.config.max_seq_len
    if len(prompts[0]) + config.sample_len > max_seq:
        raise EvalError(f"prompt ({len(prompts[0])}) + sample_len ({config.sample_len}) exceeds the models' "
                        f"max_seq_len={max_seq}")
    return prompts


def _quality(config: EvalConfig, models: Models, prompts, ks, bar) -> Dict:
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


def _resolve_sampling(config: EvalConfig, models: Models):
    """Fill the sampling settings left unset: a draft student's are the ones it was distilled with (its
    provenance), a push-forward student's temperature 1 over the whole vocabulary in vocabulary order."""
    if isinstance(models.student, DraftStudent):
        trained = trained_sampling(models.student_provenance)
    else:
        trained = Sampling()
    for name, field in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                        ("cdf_order", "order")):
        if getattr(config, name) is None:
            setattr(config, name, getattr(trained, field))


def _check_ks(config: EvalConfig, student) -> List[int]:
    smallest = 2 if isinstance(student, DraftStudent) else 1  # a draft student's k counts the exact token too
    ks = config.ks or [k for k in default_ks(student.max_k) if k >= smallest]
    for k in ks:
        if not smallest <= k <= student.max_k:
            raise EvalError(f"--k {k} is not allowed: the student decodes {smallest} <= k <= max_k={student.max_k}")
    return ks


def run_eval(config: EvalConfig) -> Dict:
    """Run the whole evaluation; returns the results (a JSON-serialisable dict, see `save_results`)."""
    from tqdm import tqdm

    config.validate()
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    models = load_models(config, device)
    _resolve_sampling(config, models)
    ks = _check_ks(config, models.student)
    dataset = heldout_data(config, models)
    if dataset.vocab_size > models.teacher.config.vocab_size:
        raise EvalError(f"the held-out data has {dataset.vocab_size} token ids but the models only "
                        f"{models.teacher.config.vocab_size}: it was made with another tokenizer")
    max_seq, trained_len = models.teacher.config.max_seq_len, trained_context_length(models)
    if config.context_len and config.context_len > max_seq - max(ks):
        raise EvalError(f"--context-len {config.context_len} does not fit: the models' max_seq_len={max_seq} holds "
                        f"at most {max_seq - max(ks)} context tokens before the largest k={max(ks)}")
    context_len = min(config.context_len or trained_len or max_seq, max_seq - max(ks))
    prompts = _sample_prompts(config, models, dataset)
    notes = []
    if trained_len and len(prompts[0]) + config.sample_len > trained_len + 1:
        notes.append(f"samples reach position {len(prompts[0]) + config.sample_len - 1}, beyond the "
                     f"{trained_len}-token contexts the student was distilled on")
    results = {"teacher": ckpt.describe_source(config.teacher), "notes": notes, "context_len": context_len,
               "student": str(ckpt.resolve_checkpoint(config.student)),
               "reference": str(ckpt.resolve_checkpoint(config.reference)) if config.reference else None,
               "student_max_k": models.student.max_k, "ks": ks,
               "settings": {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"},
               "teacher_params": models.teacher.num_params(), "student_params": models.student.num_params(),
               "machine": machine_info(device), "training": training_budget(models)}
    if isinstance(models.student, DraftStudent):
        return _draft_eval(config, models, dataset, prompts, results)
    sample_sets = 1 + len(ks) * (1 if config.freq_penalty == 0 else 2)
    bar = tqdm(total=len(ks) + sample_sets + len(config.batch_sizes) * config.speed_repeats, desc="eval",
               unit="task", disable=not config.progress, dynamic_ncols=True)
    contexts = heldout_contexts(dataset, config.contexts, context_len, seed=config.seed)
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
        results["speed_tokens"] = min(config.speed_tokens, max_seq - 16)
        results["speed"] = decode_speed(models.teacher, models.student, ks, config.batch_sizes, speed_prompts,
                                        results["speed_tokens"], config.speed_repeats, progress=bar)
    bar.close()
    results["targets"] = check_targets(results)
    return results


def _draft_eval(config: EvalConfig, models: Models, dataset, prompts, results: Dict) -> Dict:
    """The measurements of a draft student (`kforcing.evaluation.evaluate_draft`), into `results`."""
    from tqdm import tqdm

    student, ks = models.student, results["ks"]
    sampling = Sampling(config.temperature, config.top_k, config.top_p, config.cdf_order)
    common = dict(length=config.sample_len, seed=config.seed, sampling=sampling, batch_size=config.batch_size)
    results.update(kind="draft", head=student.head_config.to_dict(), sampling=vars(sampling))
    bar = tqdm(total=4 + len(config.batch_sizes) * config.speed_repeats, desc="eval", unit="task",
               disable=not config.progress, dynamic_ncols=True)
    bar.set_postfix_str("AR samples")
    reference = draft_eval.ar_samples(student.teacher, prompts, **common)
    bar.update(1)
    bar.set_postfix_str("verified decoding")
    results["verified"] = draft_eval.verified_rows(student, prompts, ks, reference=reference, **common)
    results["verified_adaptive"] = draft_eval.adaptive_row(student, prompts, reference=reference, **common)
    bar.update(1)
    bar.set_postfix_str("u-blind floor and u-shuffle")
    contexts = heldout_contexts(dataset, config.contexts, results["context_len"], seed=config.seed)
    results["diagnostics"] = draft_eval.diagnostics(student, prompts, max(ks), floor_contexts=contexts, **common)
    bar.update(1)
    bar.set_postfix_str("unverified samples")
    results["quality"], first = draft_eval.unverified_quality(student, prompts, ks, reference=reference,
                                                              models=models, **common)
    if models.tokenizer is not None:
        results["examples"] = {name: models.tokenizer.decode(tokens) for name, tokens in first.items()}
    bar.update(1)
    results["speed"] = []
    if config.batch_sizes:
        bar.set_postfix_str("decode speed")
        speed_prompts = heldout_contexts(dataset, max(config.batch_sizes), 16, 16, seed=config.seed + 2)
        results["speed_tokens"] = min(config.speed_tokens, student.config.max_seq_len - 16 - 2 * max(ks))
        results["speed"] = draft_eval.draft_speed(student, ks, config.batch_sizes, speed_prompts,
                                                  results["speed_tokens"], config.speed_repeats, config.seed,
                                                  sampling, progress=bar)
    bar.close()
    results["targets"] = draft_eval.check_draft_targets(results)
    return results


def save_results(results: Dict, out_dir) -> Path:
    """eval.json in out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(out / "eval.json", results)


def load_results(out_dir) -> Dict:
    """The results an evaluation saved in out_dir (eval.json)."""
    return read_json(Path(out_dir) / "eval.json")


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


__all__ = ["EvalConfig", "EvalError", "Models", "TARGETS", "check_targets", "default_ks", "heldout_data",
           "load_models", "load_results", "run_eval", "save_results", "trained_context_length", "training_budget"]
