"""Evaluation of a K-Forcing student against its AR teacher (`kforcing eval`, docs/method.md §6).

    kforcing eval --teacher runs/teacher --student runs/student --k 2,4 --out runs/eval

This module loads the teacher, the student (whose kind, `kforcing.students.registry.kind_of`, decides what is
measured) and an optional reference LM; finds held-out data (the token cache the student or teacher was trained on);
fills the sampling settings left unset with the ones the student was distilled for; and records what every
evaluation shares (ks, context length, settings, machine, training budget). The student's kind then adds its
measurements (`StudentKind.evaluate`):

    push-forward student  coupled agreement with the teacher on the same uniforms, sample quality per k (with and
                          without a frequency penalty), decode speed (`kforcing.students.push_forward.evaluate`)
    draft student         verified decoding (equal to AR, tokens per round), adaptive drafting, the u-blind floor,
                          unverified sample quality, decode speed (`kforcing.students.draft.evaluate`)

Samples do not stop at EOS (fixed length, as in the field's generative-perplexity protocol). Sample quality is
`kforcing.evaluation.metrics.sample_quality`: perplexity under the teacher (and the reference, re-tokenising when
its tokenizer differs), unigram entropy, distinct n-grams and the longest repeated n-gram.

`run_eval` returns the results as data (a JSON-serialisable dict, saved as eval.json with `save_results`);
`kforcing.workflows.report` turns them into Markdown tables and plots.
"""

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from kforcing_ops import CDF_ORDERS

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import Provenance, RunLayout
from ..data import TokenDataset, find_token_cache, heldout_contexts
from ..evaluation.metrics import EvalError
from ..models.transformer import ARModel
from ..options import option, parse_int_list
from ..runtime import machine_info, read_json, resolve_device, write_json_atomic
from ..students.protocol import StudentKind
from ..students.registry import kind_of
from ..teachers.protocol import is_teacher
from .loading import load_model

EVAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    compile: bool = option(False, "decode benchmark: torch.compile every decoder's step or round, AR's included "
                           "(static shapes; each is compiled before it is timed, which takes minutes on a CPU)",
                           action="store_true")
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

    teacher: object  # an ARModel or a Hugging Face HFTeacher
    student: object  # a student of `kind`
    kind: StudentKind
    tokenizer: object
    student_tokenizer: object
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
    kind = kind_of(student)
    if kind is None:
        raise EvalError(f"--student {config.student} is an AR model; it must be a K-Forcing student "
                        "(a `kforcing distill` output)")
    models = Models(teacher, student, kind, tokenizer or student_tokenizer, student_tokenizer,
                    Provenance.from_config(teacher_config), Provenance.from_config(student_config))
    kind.check_eval(config, models)
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
    if dtype == torch.float32:
        kind.store_weights(student, dtype, getattr(torch, config.draft_weights))
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


def _resolve_sampling(config: EvalConfig, models: Models):
    """Fill the sampling settings left unset with the ones the student was distilled for (its kind reads them from
    its provenance: a draft student's truncated sampling, a push-forward student's temperature 1 over the whole
    vocabulary in vocabulary order)."""
    trained = models.kind.trained_sampling(models.student_provenance)
    for name, field in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                        ("cdf_order", "order")):
        if getattr(config, name) is None:
            setattr(config, name, trained[field])


def _check_ks(config: EvalConfig, models: Models) -> List[int]:
    smallest, max_k = models.kind.smallest_k, models.student.max_k  # a draft student's k counts the exact token too
    ks = config.ks or [k for k in default_ks(max_k) if k >= smallest]
    for k in ks:
        if not smallest <= k <= max_k:
            raise EvalError(f"--k {k} is not allowed: the student decodes {smallest} <= k <= max_k={max_k}")
    return ks


def run_eval(config: EvalConfig) -> Dict:
    """Run the whole evaluation; returns the results (a JSON-serialisable dict, see `save_results`)."""

    config.validate()
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    models = load_models(config, device)
    _resolve_sampling(config, models)
    ks = _check_ks(config, models)
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
               "machine": machine_info(device), "training": training_budget(models), "kind": models.kind.name}
    return models.kind.evaluate(config, models, dataset, prompts, results)


def save_results(results: Dict, out_dir) -> Path:
    """eval.json in out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(out / "eval.json", results)


def load_results(out_dir) -> Dict:
    """The results an evaluation saved in out_dir (eval.json)."""
    return read_json(Path(out_dir) / "eval.json")


__all__ = ["EVAL_DTYPES", "EvalConfig", "Models", "default_ks", "heldout_data", "load_models", "load_results",
           "run_eval", "save_results", "trained_context_length", "training_budget"]
