"""Distillation of a student from a teacher (`kforcing distill`): the settings, the run directory, the teacher and
the data; the student's own stages come from its kind (`kforcing.students.registry`, chosen by --pathway).

    kforcing distill --teacher runs/teacher --out runs/draft                      # a draft student (chain pathway)
    kforcing distill --teacher runs/teacher --paper --out runs/student            # the push-forward student, 1,2,4
    torchrun --nproc_per_node 8 -m kforcing.cli distill --teacher runs/teacher --pathway full --out runs/student

This module owns what every kind shares: the flags (`DistillConfig`; a flag only another kind reads is an error),
one writer per run directory, --resume against the settings the run was started with (distill.json), the context
length, and the token cache contexts come from. It then hands a `kforcing.training.schedule.DistillRun` to the kind,
whose stages run the shared loop of `kforcing.training.trainer` (the push-forward student:
`kforcing.students.push_forward.distill`, docs/method.md §5; the draft student: `kforcing.students.draft.distill`,
§8).

Run directory (OUT, file names owned by `kforcing.checkpoints.checkpoint.RunLayout`):

    distill.json                  the settings of the run (checked on --resume)
    tokenizer.json                the teacher's tokenizer
    stage_k1/ metrics.jsonl       per-stage metrics: training lines every log_interval steps, validation lines
              checkpoints/step_N  training checkpoints: model.safetensors holds the EMA weights (the export),
                                  raw_weights.safetensors the optimised weights, trainer_state.pt the step and the
                                  plateau history, optimizer.pt the optimizer
              latest.json         the newest training checkpoint
              final/              the stage's exported student (EMA weights), and done.json its summary
    stage_k2/ ...
    latest.json                   points to the last finished stage's final/: `kforcing sample --ckpt OUT`,
                                  `kforcing eval --student OUT` use it

Contexts come from the teacher's own token cache, found through its checkpoint's `Provenance`, unless `corpus`
or `data_dir` say otherwise.
"""

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import List, Optional, Tuple

from ..checkpoints import checkpoint as ckpt
from ..checkpoints.checkpoint import Provenance, RunLayout
from ..data import TokenDataset, Tokenizer, find_token_cache, prepare_dataset
from ..options import option, parse_int_list
from ..runtime import read_json, resolve_device, run_lock, write_json_atomic
from ..students.draft.distill import CHAIN_HEAD_LAYERS, DRAFT_SAMPLING
from ..students.draft.student import CDF_ORDERS, NOISE_CODES, READOUTS, HeadConfig
from ..students.draft.targets import WINDOWS
from ..students.registry import kind_for_pathway, pathways, student_kinds
from ..teachers.hf_teacher import HFTeacher
from ..training.schedule import DistillRun
from ..training.stage_task import DistillError
from ..training.trainer import DistInfo, check_loop_options, distributed, loop_option, warn_changed_settings
from .loading import load_model

OBJECTIVES = ("self-forcing", "noise-inversion")
# Each pathway trains one kind of student (`kforcing.students.registry`): full a push-forward student (every weight
# trains); head / trunk / chain a draft student (the teacher frozen; a hint head on its final states, adapters on its
# blocks for hint rows only, or a chain head drafting one token per call).
PATHWAYS = pathways()
# The student `kforcing distill` trains unless told otherwise: the design comparison (README, bench/results/
# ablation_draft_cpu and round_cost_cpu) found the chain pathway's round the cheapest per draft on weight-bound
# models and its unverified samples the closest to the teacher's.
DEFAULT_PATHWAY = "chain"


def parse_tau(text: str) -> Tuple[float, float]:
    """'1.0' -> (1.0, 1.0); '0.7:1.2' -> (0.7, 1.2)."""
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError:
        raise DistillError(f"--tau must be a temperature such as 1.0 or a range such as 0.7:1.2, got {text!r}") \
            from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise DistillError(f"--tau must be T or MIN:MAX, got {text!r}")
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class DistillConfig:
    """Everything a distillation run needs; each field's help is its `kforcing distill` flag's.

    Attributes (the less obvious ones):
        teacher: the AR teacher: a checkpoint directory or a `train-teacher` run directory. A K-Forcing student
            checkpoint with max_k = m also works, to continue a schedule that starts at 2m.
        schedule: the students' max_k, in order: 1, 2, 4, ... (each stage doubles k; noise-inversion only needs
            an increasing schedule).
        steps: optimizer steps per stage: one value for every stage or one per stage.
        seq_len: context tokens N per sequence (each has N windows); default: the teacher's training length, at
            most max_seq_len - max(schedule) so that every window's tokens fit the model's positions.
        tau: (min, max): each sequence's temperature is drawn uniformly from this range; (1, 1) fixes it.
        lr: peak learning rate; default 1e-3 for models up to 256 wide, 3e-4 above.
        stop_after: stop (with a checkpoint) after this many optimizer steps in total, counted over all stages.
    """

    teacher: str = option(help="the AR teacher: a checkpoint or a train-teacher run directory, or hf:PATH (a Hugging "
                          "Face causal LM saved with save_pretrained, with its tokenizer.json; or hf:HUB_NAME)",
                          required=True)
    out_dir: str = option(help="run directory of the students", flag="--out", required=True)
    paper: bool = option(False, "the original method in one flag: --pathway full (every weight fine-tuned), "
                         "progressive self-forcing 1,2,4 at temperature 1, sinusoidal noise code, one-hot readout, "
                         "vocabulary CDF order; it overrides those settings")
    pathway: str = option(DEFAULT_PATHWAY, "the student: full (every weight fine-tuned, hint rows through the "
                          "whole model: the original method), head (a hint head on the frozen teacher's final "
                          "states), trunk (hint rows through the frozen teacher with adapters, a second pass a round), "
                          "onepass (the trunk's adapters, drafting inside the teacher's verify pass: one call a "
                          "round) or chain (a one-block head that drafts one token per call from the teacher's "
                          "features); the draft pathways keep the teacher's token rows exact and decode losslessly "
                          "with verification",
                          choices=list(PATHWAYS))
    schedule: Optional[List[int]] = option(None, "the stages' k: full doubles from 1 (default 1,2,4); head grows "
                                           "from k >= 2 (default 4)",
                                           convert=lambda text: parse_int_list(text, "--schedule") if text else None)
    readout: Optional[str] = option(None, "head/trunk: categorical (default, and chain's only one: each row outputs "
                                    "the next token's distribution, sampled with that token's uniform) or onehot "
                                    "(the draft is the argmax of a row that sees its own uniform; the full "
                                    "pathway's)",
                                    choices=list(READOUTS))
    head_layers: Optional[int] = option(None, "head/chain: Transformer blocks of the head, copied from the teacher's "
                                        f"last ones (default {HeadConfig.num_layers} for head, {CHAIN_HEAD_LAYERS} "
                                        "for chain)")
    adapter_rank: Optional[int] = option(None, "trunk/onepass: the rank of the hint-row LoRA on every linear layer; "
                                         "0: a full copy of the block weights for hint rows (default: trunk 0 for "
                                         "kforcing's own teachers, 8 for a Hugging Face teacher, which takes LoRAs "
                                         "only; onepass 32)")
    draft_vocab: Optional[int] = option(None, "chain: draft only from this many of the training text's most frequent "
                                        "tokens (a smaller LM head read per draft; verification stays exact); 0: "
                                        "the whole vocabulary; default: V/8 for vocabularies of 8192 tokens or more, "
                                        "where the drafts' LM head is most of a round's extra bytes, else the whole "
                                        "vocabulary")
    windows: str = option("student", "head: the windows targets are made on: student (its own drafts, on-policy) or "
                          "teacher (exact teacher rollouts)", choices=list(WINDOWS))
    top_k: Optional[int] = option(None, "draft pathways: the top-k of the sampling distribution the head learns (0: "
                                  f"off; default {DRAFT_SAMPLING['top_k']})")
    top_p: Optional[float] = option(None, "draft pathways: the top-p of the sampling distribution the head learns (1: "
                                    f"off; default {DRAFT_SAMPLING['top_p']})")
    boundary_beta: Optional[float] = option(None, "head/trunk with --readout onehot --windows teacher: move each "
                                            "training uniform inside its target token's CDF interval by a Beta(B, "
                                            "B) draw (B < 1: near the token's boundaries, where the argmax must "
                                            "switch); default off (uniform u). Evaluation always uses uniform u")
    cdf_order: str = option("vocab", "head: the token order of the inverse CDF that maps u to tokens: vocab (token "
                            "ids) or descending (probability); sample and eval with the same", choices=list(CDF_ORDERS))
    noise_code: str = option("sinusoid", "head: how hint rows encode their uniforms: sinusoid, dyadic (frequencies "
                             "2^j) or binary (the digits of u)", choices=list(NOISE_CODES))
    objective: str = option("self-forcing", "self-forcing (the teacher's own tokens) or the noise-inversion baseline "
                            "(data tokens, u drawn inside their teacher-CDF interval)", choices=list(OBJECTIVES))
    steps: List[int] = option([1000], "optimizer steps per stage: one value, or one per stage (500,500,1000)",
                              convert=lambda text: parse_int_list(text, "--steps"), flag_default="1000")
    batch_size: int = loop_option("batch_size")
    grad_accum: int = loop_option("grad_accum")
    seq_len: Optional[int] = option(None, "context tokens per sequence, each the anchor of a window (default: the "
                                    "teacher's training length, at most max_seq_len - max k)")
    tau: Optional[Tuple[float, float]] = option(
        None, "the temperature the student learns: T, or (full pathway) MIN:MAX to draw one per sequence uniformly "
        f"(e.g. 0.7:1.2); default 1.0 for full, {DRAFT_SAMPLING['temperature']} for the draft pathways",
        convert=lambda text: parse_tau(text) if text else None)
    lr: Optional[float] = option(None, "peak learning rate (default: 1e-3 up to width 256, 3e-4 above)")
    min_lr_ratio: float = loop_option("min_lr_ratio")
    warmup_steps: int = loop_option("warmup_steps", 50, "linear warmup steps per stage")
    weight_decay: float = loop_option("weight_decay", 0.0)
    beta1: float = loop_option("beta1")
    beta2: float = loop_option("beta2")
    grad_clip: float = loop_option("grad_clip")
    ema_decay: float = option(0.999, "EMA decay of the exported weights")
    noise_lr_scale: float = option(1.0, "learning-rate multiplier of the noise encoder (the only new weights of "
                                   "stage 1)")
    plateau_patience: Optional[int] = option(None, "also end a stage once this many evaluations in a row gain less "
                                             "than --plateau-delta in validation exact match (default: off)")
    plateau_delta: float = option(0.005, "the gain that counts as progress")
    min_steps: int = option(0, "no plateau stop before this many steps of a stage")
    corpus: Optional[List[str]] = option(None, "contexts from this corpus (as in train-teacher); default: the "
                                         "teacher's own token cache", action="append")
    text_field: str = option("text", "the text field of JSONL records / dataset rows")
    corpus_max_bytes: Optional[int] = option(None, "read at most this many MB of --corpus", flag="--corpus-max-mb",
                                             convert=lambda mb: None if mb is None else int(mb * 1e6), type=float)
    data_dir: Optional[str] = option(None, "token cache directory for --corpus (default: OUT/data)")
    val_fraction: float = option(0.01, "held-out share of documents for --corpus")
    eval_interval: int = loop_option("eval_interval", help="steps between validation metrics")
    eval_batches: int = option(8, "batches per validation")
    ar_eval_contexts: int = option(128, "held-out contexts for the coupled agreement with the AR teacher at the "
                                   "start and end of each stage (0: off)")
    save_interval: int = loop_option("save_interval", 500)
    log_interval: int = loop_option("log_interval")
    keep_checkpoints: int = loop_option("keep_checkpoints", help="training checkpoints kept per stage")
    seed: int = option(0, "seed of the noise, the temperatures and the data order")
    device: str = loop_option("device")
    dtype: str = loop_option("dtype", help="autocast dtype of the student; auto = bfloat16 on GPU, float32 on CPU "
                             "(targets: float32 teacher passes, float64 CDF)")
    compile: bool = loop_option("compile", help="torch.compile the student's training forward")
    resume: bool = loop_option("resume", help="continue the run in OUT: finished stages are kept, an interrupted one "
                               "continues exactly")
    stop_after: Optional[int] = loop_option("stop_after", help="stop (with a checkpoint) after this many steps in "
                                            "total over all stages")
    tensorboard: bool = loop_option("tensorboard", help="also write TensorBoard events per stage")
    progress: bool = loop_option("progress", help="hide the progress bars")

    def validate(self):
        if self.paper:
            self._apply_paper()
        if self.objective not in OBJECTIVES:
            raise DistillError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.pathway not in pathways():
            raise DistillError(f"unknown pathway {self.pathway!r}; choose one of {pathways()}")
        kind = kind_for_pathway(self.pathway)
        self._reject_other_kinds_options(kind)
        if self.schedule is None:
            self.schedule = list(kind.default_schedule)
        kind.configure(self)
        self.stage_steps()  # validates steps
        check_loop_options(self, DistillError)
        for name in ("min_steps", "ar_eval_contexts"):
            if getattr(self, name) < 0:
                raise DistillError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise DistillError(f"seq_len must be >= 1, got {self.seq_len}")
        low, high = self.tau
        if not (0.0 < low <= high < math.inf):
            raise DistillError(f"tau range must satisfy 0 < min <= max, got {low}..{high}")
        if not self.noise_lr_scale > 0.0:
            raise DistillError(f"noise_lr_scale must be > 0, got {self.noise_lr_scale}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DistillError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.plateau_patience is not None and self.plateau_patience < 1:
            raise DistillError(f"plateau_patience must be >= 1 (or None), got {self.plateau_patience}")
        if self.stop_after is not None and not 1 <= self.stop_after <= sum(self.stage_steps()):
            raise DistillError(f"stop_after must be in [1, {sum(self.stage_steps())}] (steps of all stages), "
                               f"got {self.stop_after}")

    def _apply_paper(self):
        """--paper: the original method. Settings it fixes may not be given beside it (they would be ignored)."""
        fixed = [("pathway", DEFAULT_PATHWAY), ("tau", None)]
        fixed += [(name, unset) for kind in student_kinds() for name, unset in kind.options.items()]
        given = [name for name, unset in fixed if getattr(self, name) not in (unset, "full")]
        if given:
            raise DistillError(f"--paper fixes {', '.join('--' + n.replace('_', '-') for n in given)}; drop "
                               "them, or use --pathway full to choose settings yourself")
        self.pathway, self.tau = "full", (1.0, 1.0)

    def _reject_other_kinds_options(self, kind):
        """A flag only another kind of student reads is an error, never silently ignored."""
        for other in student_kinds():
            if other is kind:
                continue
            for name, unset in other.options.items():
                if name not in kind.options and getattr(self, name) != unset:
                    raise DistillError(f"--{name.replace('_', '-')} applies to the {other.title}'s pathways "
                                       f"({', '.join(other.pathways)}), not to --pathway {self.pathway} (a "
                                       f"{kind.title})")

    def stage_steps(self) -> List[int]:
        """Steps of each stage (one value repeated, or one per stage)."""
        steps = list(self.steps)
        if len(steps) == 1:
            steps = steps * len(self.schedule)
        if len(steps) != len(self.schedule):
            raise DistillError(f"steps has {len(steps)} values for {len(self.schedule)} stages "
                               f"(schedule {self.schedule}): give one value or one per stage")
        if any(not isinstance(s, int) or s < 1 for s in steps):
            raise DistillError(f"steps per stage must be positive ints, got {steps}")
        return steps

    def effective_lr(self, model_config):
        if self.lr is not None:
            return self.lr
        return 1e-3 if model_config.n_embd <= 256 else 3e-4

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["tau"] = list(data["tau"])
        return data


# ---------------------------------------------------------------------------------------------------------
# The run


def _token_cache(config: DistillConfig, teacher: Optional[Provenance], tokenizer: Optional[Tokenizer],
                 layout: RunLayout, info: DistInfo) -> TokenDataset:
    """The token dataset contexts come from: the teacher's own cache (its provenance), or --corpus / --data-dir."""
    if tokenizer is None:
        raise DistillError(f"teacher {ckpt.describe_source(config.teacher)} has no tokenizer.json: the contexts "
                           "cannot be tokenised (and the students would have no tokenizer)")
    if config.data_dir is None and config.corpus is None:
        candidates = [teacher.token_cache if teacher else None, RunLayout(Path(config.teacher).expanduser()).data]
        dataset = find_token_cache(candidates, tokenizer)
        if dataset is not None:
            return dataset
    settings = teacher.settings if teacher is not None and teacher.stage == "teacher" else {}
    corpus = config.corpus or settings.get("corpus")
    if not corpus:
        raise DistillError(f"cannot find the teacher's training data next to {config.teacher}; pass --corpus "
                           "(e.g. --corpus stdlib) to draw contexts from a corpus")
    data_dir = Path(config.data_dir) if config.data_dir else layout.data
    own = config.corpus is not None
    args = (corpus, tokenizer, data_dir, config.val_fraction if own else settings.get("val_fraction", 0.01),
            config.text_field if own else settings.get("text_field", config.text_field),
            config.corpus_max_bytes if own else settings.get("corpus_max_bytes"))
    if info.main:
        dataset = prepare_dataset(*args, progress=config.progress)
    info.barrier()
    return dataset if info.main else prepare_dataset(*args, verify=False)


_TRAJECTORY_FIELDS = ("objective", "steps", "batch_size", "grad_accum", "seq_len", "tau", "lr", "min_lr_ratio",
                      "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "ema_decay", "plateau_patience",
                      "plateau_delta", "min_steps", "corpus", "seed", "dtype")


def distill(config: DistillConfig) -> dict:
    """Run (or resume) a progressive distillation; returns a summary.

    The summary: {"stages": [per-stage summaries (k, steps, final checkpoint, val metrics, AR agreement)],
    "checkpoint": the final student's directory, "out_dir"}.

    Raises DistillError / ValueError for bad settings, kforcing.checkpoints.checkpoint.CheckpointError for missing or
    unfitting checkpoints, kforcing.data errors for data problems, kforcing.training.trainer.TrainingError for a
    non-finite loss.
    """
    config.validate()
    with distributed(config.device) as info:
        # One writer per run directory: the lock is taken before the checks for an existing run, so two runs
        # started together on one --out cannot both pass them (under torchrun, rank 0 holds it for all).
        with run_lock(config.out_dir, "distill") if info.main else contextlib.nullcontext():
            return _distill(config, info)


HF_CONTEXT_LEN = 256  # default contexts of a Hugging Face teacher (--seq-len overrides)


def _context_length(config: DistillConfig, teacher, provenance: Optional[Provenance]) -> int:
    max_k, max_seq = max(config.schedule), teacher.config.max_seq_len
    if config.seq_len is not None:
        seq_len = config.seq_len
    else:  # the teacher's training length (a teacher run's only: a student's is its own context length)
        trained = provenance.seq_len if provenance is not None and provenance.stage == "teacher" else None
        if isinstance(teacher, HFTeacher):  # no recorded training length; its max_seq_len can be 100k+
            trained = HF_CONTEXT_LEN
        seq_len = min(trained or max_seq, max_seq - max_k)
    if seq_len < 1 or seq_len + max_k > max_seq:
        raise DistillError(f"seq_len={seq_len} + max k={max_k} exceeds the teacher's max_seq_len={max_seq}: every "
                           "window's tokens must fit the model's positions")
    return seq_len


def _write_settings(config: DistillConfig, layout: RunLayout, teacher_id: str, seq_len: int):
    """distill.json: checked against the current settings on --resume (another teacher is an error)."""
    current = config.to_json()
    if layout.distill_settings.is_file():
        saved = read_json(layout.distill_settings)
        if saved.get("teacher_checkpoint") not in (None, teacher_id):
            raise DistillError(f"{layout.root} was distilled from {saved['teacher_checkpoint']}, not {teacher_id}; "
                               "resume with the original --teacher or choose another --out")
        warn_changed_settings(saved, current, _TRAJECTORY_FIELDS, True)
    write_json_atomic(layout.distill_settings, {**current, "teacher_checkpoint": teacher_id,
                                                "seq_len_used": seq_len})


def _distill(config: DistillConfig, info: DistInfo) -> dict:
    device = resolve_device(config.device, info.local_rank)
    layout = RunLayout(config.out_dir)
    if info.main:
        layout.claim("distill", "distill")
    if layout.distill_settings.is_file() and not config.resume:
        raise DistillError(f"{layout.root} already holds a distillation run; pass --resume to continue it (finished "
                           "stages are kept), or choose another --out")
    # The settings a resumed run was started with, read before the teacher loads: a damaged file fails at once.
    saved = read_json(layout.distill_settings) if config.resume and layout.distill_settings.is_file() else None
    kind = kind_for_pathway(config.pathway)
    teacher, tokenizer, teacher_config = load_model(config.teacher, device=device)
    # A Hugging Face teacher is named by its resolved "hf:PATH"; a kforcing one by its checkpoint directory.
    if isinstance(teacher, HFTeacher):
        teacher_id = teacher.source
    else:
        teacher_id = str(ckpt.resolve_checkpoint(config.teacher).resolve())
    provenance = ckpt.Provenance.from_config(teacher_config)
    kind.check_run(config, teacher, teacher_id, info)
    config = kind.prepare(config, teacher, saved)  # a copy when it changes: the caller's stays as given
    seq_len = _context_length(config, teacher, provenance)
    if info.main:
        layout.root.mkdir(parents=True, exist_ok=True)
        _write_settings(config, layout, teacher_id, seq_len)
        if tokenizer is not None:
            tokenizer.save(layout.tokenizer)
    info.barrier()
    dataset = _token_cache(config, provenance, tokenizer, layout, info)
    if dataset.vocab_size > teacher.config.vocab_size:
        raise DistillError(f"the data's tokenizer has {dataset.vocab_size} tokens but the teacher's vocabulary has "
                           f"{teacher.config.vocab_size}: the corpus was tokenised with another tokenizer")
    return kind.distill(DistillRun(config, teacher, teacher_id, dataset, tokenizer, seq_len, layout, info, device))


__all__ = ["DEFAULT_PATHWAY", "DistillConfig", "OBJECTIVES", "PATHWAYS", "distill", "parse_tau"]
