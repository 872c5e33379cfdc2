"""Every Markdown table and plot of `kforcing eval` and `kforcing demo`, made from their results (data).

A generated report holds what the run computed: tables, plots, the settings and the budget. Commentary on what
the numbers mean is written by hand, outside generated files.

    eval_tables / write_eval_report     eval.md and its plots, in the student kind's layout
                                        (`kforcing.students.protocol.StudentKind.eval_tables`, `plot_eval`)
    summary_table                       the demo's short table on stdout
    demo_markdown                       the demo's report.md, section by section (SECTIONS)
    plot_eval / plot_training           the PNG plots (matplotlib's Agg backend: no display needed)
"""

from pathlib import Path
from typing import Dict, List

from ..evaluation.report_tables import pyplot, quality_table, save_figure, speed_table
from ..runtime import write_text_atomic
from ..students.draft.report import draft_summary_lines, draft_tables, sampling_text
from ..students.push_forward.report import agreement_table, targets_table
from ..students.registry import kind_named

SECTIONS = ["## Summary", "## Setup", "## 1. Corpus and tokenizer", "## 2. Teacher", "## 3. Distillation",
            "## 4. Coupled agreement", "## 5. Sample quality", "## 6. Decode speed", "## 7. Quality targets",
            "## 8. Draft student: verified and unverified decoding", "## 9. Samples", "## 10. Files and next steps"]
_HEADLINE_TARGETS = ("agree_offset_1", "agree_offset_4", "sample_quality")


# ---------------------------------------------------------------------------------------------------------
# Evaluation tables


def eval_tables(results: Dict) -> str:
    """The Markdown tables of an evaluation, in its student kind's layout."""
    return kind_named(results.get("kind", "pushforward")).eval_tables(results)


def write_eval_report(results: Dict, out_dir, plots: bool = True) -> Dict[str, str]:
    """eval.md and (plots=True) quality_vs_k.png, agreement.png, throughput.png in out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "eval.md"}
    md = ["# K-Forcing evaluation\n", f"Teacher: `{results['teacher']}`  ", f"Student: `{results['student']}` "
          f"(max_k={results['student_max_k']})\n", eval_tables(results)]
    if plots:
        for name, path in plot_eval(results, out).items():
            paths[name] = path
            md.append(f"\n![{name}]({path.name})\n")
    write_text_atomic(paths["markdown"], "".join(md))
    return {key: str(value) for key, value in paths.items()}


# ---------------------------------------------------------------------------------------------------------
# Plots


def plot_eval(results: Dict, out: Path) -> Dict[str, Path]:
    """The PNG plots of an evaluation in `out` (its student kind's: e.g. quality_vs_k.png, agreement.png,
    throughput.png for a push-forward student)."""
    return kind_named(results.get("kind", "pushforward")).plot_eval(results, out)


def plot_training(teacher_records: List[Dict], stage_records: Dict[int, List[Dict]], out: Path) -> Dict[str, Path]:
    """teacher_loss.png (train and validation loss) and distill_curves.png (every stage back to back) in `out`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    train = [r for r in teacher_records if "train_loss" in r]
    val = [r for r in teacher_records if "val_loss" in r]
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="AR teacher")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = {"teacher_loss": save_figure(fig, out / "teacher_loss.png")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    offset = 0
    for k, records in stage_records.items():
        if not records:
            continue
        train = [r for r in records if "train_loss" in r]
        val = [r for r in records if "val_exact_match" in r]
        axes[0].plot([offset + r["step"] for r in train], [r["train_loss"] for r in train], label=f"stage k={k}")
        line, = axes[1].plot([offset + r["step"] for r in val], [r["val_exact_match"] for r in val], "o-",
                             label=f"k={k}: exact match vs stage targets")
        ar = [r for r in val if "ar_agree_1" in r]
        axes[1].plot([offset + r["step"] for r in ar], [r["ar_agree_1"] for r in ar], "s", color=line.get_color(),
                     alpha=0.5, label=f"k={k}: AR agreement, offset 1")
        offset += max(r["step"] for r in records)
        for ax in axes:
            ax.axvline(offset, color="k", alpha=0.2)
    axes[0].set(title="distillation: training loss", xlabel="step (stages back to back)")
    axes[1].set(title="held-out agreement", xlabel="step (stages back to back)", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    paths["distill_curves"] = save_figure(fig, out / "distill_curves.png")
    return paths


# ---------------------------------------------------------------------------------------------------------
# The demo


def _agree(stage, k):
    return [stage.get(f"ar_agree_{j}") for j in range(1, k + 1)]


def _table_line(label, values, last) -> str:
    return f"{label:24}" + "".join(values) + last


def summary_table(data: Dict) -> str:
    """The short table the demo prints at the end (from its summary.json data)."""
    results, teacher = data["eval"], data["teacher"]
    lines = ["", "K-Forcing demo summary", "=" * 22,
             f"teacher: {teacher['preset']} preset, {teacher['params']:,} parameters, {teacher['steps']} steps, "
             f"val loss {teacher['first_val_loss']:.2f} -> {teacher['val_loss']:.2f}"]
    if data.get("draft"):
        lines += [""] + draft_summary_lines(data["draft"])
    lines += ["", "push-forward student (`kforcing distill --pathway full`): k tokens per forward pass, temperature "
              f"{results['settings']['temperature']:g}"]
    for stage in data["stages"]:
        initial = stage.get("initial") or {}
        lines.append(f"stage k={stage['k']}: {stage['step']} steps, held-out exact match vs its teacher "
                     f"{initial.get('val_exact_match', float('nan')):.2f} -> {stage['val_exact_match']:.2f}")
    ks = results["ks"]
    agreement = {a["k"]: a for a in results["agreement"]}
    quality = {(q["k"], q["freq_penalty"]): q for q in results["quality"]}
    lines += ["", f"{'':24}" + "".join(f"{'k=' + str(k):>10}" for k in ks) + f"{'AR':>10}",
              _table_line("agreement offset 1", [f"{agreement[k]['per_offset'][0]:>10.3f}" for k in ks], f"{'1':>10}"),
              _table_line("exact match (window)", [f"{agreement[k]['exact_match']:>10.3f}" for k in ks], f"{'1':>10}")]
    for key, label in (("ppl_teacher", "PPL under teacher"), ("unigram_entropy", "unigram entropy")):
        lines.append(_table_line(label, [f"{quality[(k, 0.0)][key]:>10.2f}" for k in ks],
                                 f"{quality[(0, 0.0)][key]:>10.2f}"))
    by = {s["decoder"]: s for s in results.get("speed", []) if s["batch"] == 1}
    if by:
        lines.append(_table_line("tokens/s (batch 1)", [f"{by[f'k={k}']['tokens_per_s']:>10.0f}" for k in ks],
                                 f"{by['AR']['tokens_per_s']:>10.0f}"))
        lines.append(_table_line("speedup vs AR (batch 1)", [f"{by[f'k={k}']['speedup']:>9.2f}x" for k in ks],
                                 f"{'1.00x':>10}"))
    targets = {name: t for name, t in results["targets"].items() if name in _HEADLINE_TARGETS}
    reached = [name for name, t in targets.items() if t["reached"]]
    missed = [name for name, t in targets.items() if not t["reached"]]
    lines += ["", f"quality targets at k={max(ks)}: reached {reached or 'none'}; not reached {missed or 'none'}"]
    return "\n".join(lines)


def plot_headline(data: Dict, out: Path) -> Dict[str, Path]:
    """headline.png: speed against AR per batch size of the default (draft) student's decoding modes and of the
    push-forward student at its largest k, from the demo's summary data (an empty dict without a decode benchmark)."""
    series = {}
    draft = (data.get("draft") or {}).get("eval") or {}
    if draft.get("speed"):
        k = max(draft["ks"])
        for name, label in (("verified adaptive", "draft student, verified (adaptive; = AR's tokens)"),
                            (f"verified k={k}", f"draft student, verified k={k}"),
                            (f"unverified k={k}", f"draft student, unverified k={k}")):
            series[label] = [(s["batch"], s["speedup"]) for s in draft["speed"] if s["decoder"] == name]
    results = data["eval"]
    if results.get("speed"):
        k = max(results["ks"])
        series[f"push-forward student, k={k}"] = [(s["batch"], s["speedup"]) for s in results["speed"]
                                                  if s["decoder"] == f"k={k}"]
    series = {label: points for label, points in series.items() if points}
    if not series:
        return {}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in series.items():
        ax.plot([b for b, _ in points], [v for _, v in points], "o-", label=label)
    ax.axhline(1.0, color="k", linestyle="--", label="AR teacher")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size", ylabel="tokens/s over AR's", title=f"speed against AR ({results['machine']['device']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return {"headline": save_figure(fig, out / "headline.png")}


def _sample_cell(text: str, limit: int = 160) -> str:
    """A sample's start as one Markdown table cell: newlines shown as ⏎, pipes and backticks escaped."""
    cell = text[:limit].replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("\n", " ⏎ ")
    return cell + (" …" if len(text) > limit else "")


def first_samples_table(data: Dict) -> str:
    """The first sample of each model side by side (same seed and prompt per sampling setting, so rows of one
    setting are coupled): the teacher and the default student at its sampling settings, the teacher and the
    push-forward student at theirs."""
    lines = ["| model | decoding | the first sample's start |", "|---|---|---|"]
    draft = (data.get("draft") or {}).get("eval") or {}
    examples = draft.get("examples") or {}
    if examples:
        k = max(draft["ks"])
        settings = sampling_text(draft)
        lines.append(f"| teacher | AR, {settings} | {_sample_cell(examples['AR teacher (= verified)'])} |")
        lines.append("| draft student (default) | verified: the teacher's sample, token for token | (the row above) |")
        if f"unverified k={k}" in examples:
            lines.append(f"| draft student (default) | unverified, k={k} | "
                         f"{_sample_cell(examples[f'unverified k={k}'])} |")
    results = data["eval"]
    examples = results.get("examples") or {}
    if examples:
        k = max(results["ks"])
        temperature = results["settings"]["temperature"]
        lines.append(f"| teacher | AR, temperature {temperature:g} | {_sample_cell(examples['AR teacher'])} |")
        lines.append(f"| push-forward student | k={k} | {_sample_cell(examples[f'student k={k}'])} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _rel(path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _setup_sections(data: Dict, plots: Dict[str, Path], out: Path) -> List[str]:
    """Sections Setup, Corpus and Teacher."""
    prof, machine, corpus, teacher = data["profile"], data["machine"] or {}, data["corpus"], data["teacher"]
    phases = ", ".join(f"{name} {_duration(seconds)}" for name, seconds in data["phase_seconds"].items()
                       if seconds is not None)
    size = "all of it" if corpus["max_bytes"] is None else f"the first {corpus['max_bytes'] / 1e6:.1f} MB"
    return [
        f"- Machine: {machine.get('device')} ({machine.get('machine')}, {machine.get('cpus')} CPUs, "
        f"{machine.get('cpu_threads')} torch threads{', ' + machine['gpu'] if machine.get('gpu') else ''}), "
        f"torch {machine.get('torch')}, Python {machine.get('python')}.\n"
        f"- Wall time per phase: {phases} (a resumed run reports the times of the run that did the phase).\n"
        f"- Profile `{prof['name']}` ({prof['minutes']}): the `{prof['preset']}` preset, budgets as in the "
        "sections below.\n",
        f"The default corpus (`stdlib`: this Python's standard-library sources and pydoc topics), {size}; a "
        f"byte-level BPE of {corpus['vocab_size']} tokens trained on it. {corpus['train_tokens']:,} training "
        f"tokens ({corpus['train_documents']} documents) and {corpus['val_tokens']:,} held-out tokens "
        f"({corpus['val_documents']} documents).\n",
        f"`{teacher['preset']}` preset, {teacher['params']:,} parameters; {teacher['steps']} steps of "
        f"{teacher['batch_size']} x {teacher['seq_len']} tokens ({teacher['tokens']:,} tokens). Validation "
        f"loss {teacher['first_val_loss']:.3f} -> {teacher['val_loss']:.3f} nats.\n"
        f"\n![teacher loss]({_rel(plots['teacher_loss'], out)})\n"]


def _distill_section(data: Dict, plots: Dict[str, Path], out: Path) -> str:
    lines = ["Progressive self-forcing distillation (docs/method.md §5). 'vs stage targets': held-out exact "
             "match against the stage's own teacher; 'AR agreement': coupled agreement with the AR teacher per "
             "offset, before -> after the stage.\n\n",
             "| stage | steps | windows seen | exact match vs stage targets (start -> end) | AR agreement per "
             "offset, start | AR agreement per offset, end |\n|---|---|---|---|---|---|\n"]

    def fmt(values):
        return ", ".join("-" if v is None else f"{v:.3f}" for v in values)

    for stage in data["stages"]:
        initial = stage.get("initial") or {}
        source = "AR" if not stage["teacher_max_k"] else f"k={stage['teacher_max_k']}"
        start = initial.get("val_exact_match", float("nan"))
        lines.append(f"| k={stage['k']} (from {source}) | {stage['step']} | {stage['windows']:,} | {start:.3f} "
                     f"-> {stage['val_exact_match']:.3f} | {fmt(_agree(initial, stage['k']))} | "
                     f"{fmt(_agree(stage, stage['k']))} |\n")
    lines.append(f"\n![distillation curves]({_rel(plots['distill_curves'], out)})\n")
    return "".join(lines)


def _files_section(data: Dict, out: Path) -> str:
    return (f"- Teacher checkpoint: `{data['files']['teacher_checkpoint']}`\n"
            "- Students: `student/stage_kK/final` (the last student: `student`, through its latest.json)\n"
            "- Numbers: `summary.json`, `eval/eval.json`; per-stage metrics: `student/stage_kK/metrics.jsonl`.\n"
            f"- Sample from the student: `kforcing sample --ckpt {out}/student --k {max(data['eval']['ks'])} "
            "--prompt \"def \"`\n"
            f"- Sample losslessly from the draft student: `kforcing sample --ckpt {out}/draft --verify "
            "--temperature 0.7 --top-k 50 --top-p 0.9 --prompt \"def \"`\n"
            f"- Evaluate again: `kforcing eval --teacher {out}/teacher --student {out}/student --k "
            f"{','.join(map(str, data['eval']['ks']))}`\n")


def _draft_section(data: Dict, plots: Dict[str, Path], out: Path) -> str:

    draft = data["draft"]
    stage = draft["stages"][-1]
    text = ("A draft student keeps the teacher frozen: its token rows are the teacher's own, and trainable hint rows "
            "draft the next tokens from the uniforms (docs/method.md §8). Verified decoding checks every draft "
            "against the teacher's token with the same uniform, so its output is the teacher's AR sample, token for "
            "token; unverified decoding keeps the drafts. "
            f"Trained {stage['step']} steps on {stage['windows_seen']:,} windows; held-out tokens per pass during "
            f"training {stage['initial'].get('verified_tokens_per_pass', float('nan')):.2f} -> "
            f"{stage.get('verified_tokens_per_pass', float('nan')):.2f}.\n\n")
    pictures = "".join(f"\n![{name}]({_rel(path, out)})\n" for name, path in plots.items()
                       if name.startswith("draft_"))
    return text + draft_tables(draft["eval"]).replace("### ", "#### ") + pictures


def _samples_section(data: Dict) -> str:
    """The first sample of every set, decoded: the push-forward student's beside the teacher's at temperature 1,
    then the draft student's unverified ones beside the teacher's at the draft student's settings."""
    def blocks(examples):
        return "".join(f"\n**{name}**\n\n```\n{text[:600].replace('```', chr(39) * 3)}\n```\n"
                       for name, text in examples.items())

    text = ("The first unconditional sample of each set (same seed, so the rows of one set are coupled), decoded. "
            "Push-forward student and teacher at temperature "
            f"{data['eval']['settings']['temperature']:g}:\n" + blocks(data["eval"].get("examples", {})))
    draft = (data.get("draft") or {}).get("eval") or {}
    if draft.get("examples"):
        text += (f"\nDraft student and teacher at {sampling_text(draft)} (verified decoding gives the teacher's "
                 "sample):\n" + blocks(draft["examples"]))
    return text


def demo_markdown(data: Dict, plots: Dict[str, Path], out: Path) -> str:
    """report.md: every section in SECTIONS, from the demo's summary.json data and its plots."""
    results, prof = data["eval"], data["profile"]
    flag = {"quick": " --quick", "default": "", "full": " --full"}[prof["name"]]
    headline = f"\n![speed against AR]({_rel(plots['headline'], out)})\n" if "headline" in plots else ""
    samples = first_samples_table(data)
    body = [f"```\n{summary_table(data).strip()}\n```\n{headline}" + (f"\n{samples}" if samples else ""),
            *_setup_sections(data, plots, out),
            _distill_section(data, plots, out),
            agreement_table(results) + f"\n\n![agreement]({_rel(plots['agreement'], out)})\n",
            quality_table(results) + f"\n\n![quality vs k]({_rel(plots['quality_vs_k'], out)})\n",
            (speed_table(results) or "(skipped)")
            + (f"\n\n![throughput]({_rel(plots['throughput'], out)})\n" if "throughput" in plots else "\n"),
            f"At k={results['targets']['k']}, no frequency penalty.\n\n" + targets_table(results) + "\n",
            _draft_section(data, plots, out),
            _samples_section(data),
            _files_section(data, out)]
    md = [f"# K-Forcing demo report ({prof['name']} profile)\n\n",
          f"Generated by `kforcing demo{flag}` on {data['created']}" + (f", git {data['git']}" if data["git"] else "")
          + ".\n"]
    for title, text in zip(SECTIONS, body):
        md.append(f"\n{title}\n\n{text}")
    return "".join(md)


__all__ = ["SECTIONS", "demo_markdown", "eval_tables", "first_samples_table", "plot_eval", "plot_headline",
           "plot_training", "summary_table", "write_eval_report"]
