"""What the reports of every kind of student share (`kforcing.students.*.report`, `kforcing.workflows.report`):
Markdown cells and rows, the sample-quality, decode-speed and targets tables, and matplotlib figures saved off-screen
(the Agg backend)."""

from pathlib import Path
from typing import Dict


def fmt(value, digits=3) -> str:
    """A table cell: floats with `digits` decimals."""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def row(cells) -> str:
    """A Markdown table row of the cells."""
    return "| " + " | ".join(cells) + " |"


def quality_table(results: Dict) -> str:
    settings = results["settings"]
    has_ref = any("ppl_reference" in q for q in results["quality"])
    prompt = "unconditional (EOS prompt)" if not settings["prompt_len"] else f"{settings['prompt_len']}-token prompts"
    cols = ["model", "k", "freq. penalty", "PPL (teacher)"] + (["PPL (reference)"] if has_ref else []) + [
        "unigram entropy", "distinct-2", "distinct-3", "longest repeat (mean / max)", "match AR"]
    lines = [f"{settings['num_samples']} samples of {settings['sample_len']} tokens, {prompt}, temperature "
             f"{settings['temperature']:g}, the same seeds for every row. Entropy in nats; "
             "'match AR': share of tokens equal to the AR sample of the same seed.\n", row(cols),
             "|" + "---|" * len(cols)]
    for q in results["quality"]:
        cells = [q["model"], str(q["k"]) if q["k"] else "-", fmt(q["freq_penalty"], 2) if q["k"] else "-",
                 fmt(q["ppl_teacher"], 2)] + ([fmt(q.get("ppl_reference", float("nan")), 2)] if has_ref else []) + [
            fmt(q["unigram_entropy"]), fmt(q["distinct_2"]), fmt(q["distinct_3"]),
            f"{q['longest_repeat_mean']:.1f} / {q['longest_repeat_max']}",
            fmt(q["token_match_with_ar"]) if "token_match_with_ar" in q else "-"]
        lines.append(row(cells))
    lines += [f"\nNote: {note}." for note in results.get("notes", [])]
    return "\n".join(lines)


def speed_table(results: Dict) -> str:
    """'' when the evaluation ran no decode benchmark."""
    if not results.get("speed"):
        return ""
    machine, settings = results["machine"], results["settings"]
    lines = [f"{results['speed_tokens']} new tokens after 16-token prompts, {machine['device']} "
             f"({machine['cpu_threads']} threads), {settings.get('dtype', 'float32')}"
             f"{', every decoder compiled' if settings.get('compile') else ''}, medians of "
             f"{settings['speed_repeats']} interleaved rounds; speedup = median per-round AR time / this time; a "
             "pass's cost in AR steps = its ms / an AR pass's ms at the same batch size.\n",
             "| batch | decoder | passes | tokens/s | ms/pass | AR steps/pass | speedup vs AR |",
             "|---|---|---|---|---|---|---|"]
    ar_ms = {s["batch"]: s["ms_per_pass"] for s in results["speed"] if s["decoder"] == "AR"}
    for s in results["speed"]:
        cost = f"{s['ms_per_pass'] / ar_ms[s['batch']]:.2f}" if s["batch"] in ar_ms else "-"
        lines.append(f"| {s['batch']} | {s['decoder']} | {s['passes']} | {s['tokens_per_s']:.0f} | "
                     f"{s['ms_per_pass']:.2f} | {cost} | {s['speedup']:.2f}x |")
    return "\n".join(lines)


def targets_table(results: Dict, names: Dict[str, str]) -> str:
    """The targets of `results["targets"]` ({key: {"value", "target", "reached"}}) that `names` ({key: what it
    measures}) lists, in its order: value, goal, reached."""
    targets = results.get("targets") or {}
    lines = ["| target | value | goal | reached |", "|---|---|---|---|"]
    for key, name in names.items():
        if key in targets:
            t = targets[key]
            value = f"{t['value']:.3f}" if isinstance(t["value"], float) else t["value"]
            lines.append(f"| {name} | {value} | {t['target']} | {'yes' if t['reached'] else 'no'} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save `fig` to `path` (PNG) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


__all__ = ["fmt", "pyplot", "quality_table", "row", "save_figure", "speed_table", "targets_table"]
