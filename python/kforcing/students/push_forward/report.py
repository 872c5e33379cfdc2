"""The Markdown tables and plots of a push-forward student's evaluation (`kforcing.students.push_forward.evaluate`).

    push_forward_tables   agreement, sample quality, decode speed and quality targets
    plot_push_forward     quality_vs_k.png, agreement.png and throughput.png
"""

from pathlib import Path
from typing import Dict

from ...evaluation.report_tables import fmt, pyplot, quality_table, save_figure, speed_table
from ...evaluation.report_tables import targets_table as shared_targets_table

_TARGET_NAMES = {"agree_offset_1": "agreement at offset 1", "agree_offset_4": "agreement at offset 4",
                 "ppl_ratio": "PPL(student) / PPL(AR samples), under the teacher",
                 "entropy_rel": "relative entropy gap, abs(H(student) - H(AR)) / H(AR)",
                 "sample_quality": "sample quality (both of the above)"}


def agreement_table(results: Dict) -> str:
    max_k = max(results["ks"])
    lines = [f"{results['agreement'][0]['windows']} held-out contexts per k (up to {results.get('context_len')} "
             "tokens). Offset j: the share of windows whose j-th token equals the teacher's; exact: all k tokens "
             "equal.\n", "| k | " + " | ".join(f"offset {j}" for j in range(1, max_k + 1)) + " | exact match |",
             "|" + "---|" * (max_k + 2)]
    for a in results["agreement"]:
        cells = [fmt(v) for v in a["per_offset"]] + [""] * (max_k - a["k"])
        lines.append(f"| {a['k']} | " + " | ".join(cells) + f" | {fmt(a['exact_match'])} |")
    return "\n".join(lines)


def targets_table(results: Dict) -> str:
    """The quality targets at the largest k (`kforcing.students.push_forward.evaluate.TARGETS`)."""
    return shared_targets_table(results, _TARGET_NAMES)


def push_forward_tables(results: Dict) -> str:
    """The Markdown tables of an evaluation (agreement, sample quality, decode speed, targets)."""
    parts = ["### Coupled agreement with the AR teacher (same contexts, same u)\n\n" + agreement_table(results),
             "### Sample quality\n\n" + quality_table(results)]
    if results.get("speed"):
        parts.append("### Decode speed\n\n" + speed_table(results))
    if results.get("targets"):
        parts.append(f"### Quality targets at k={results['targets']['k']}, no frequency penalty\n\n"
                     + targets_table(results))
    return "\n\n".join(parts) + "\n"


def plot_push_forward(results: Dict, out: Path) -> Dict[str, Path]:
    """quality_vs_k.png, agreement.png and (with a decode benchmark) throughput.png in `out`."""
    plt = pyplot()
    ks = results["ks"]
    teacher = next(q for q in results["quality"] if q["k"] == 0)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("ppl_teacher", "unigram_entropy", "distinct_3"),
                              ("perplexity under the teacher", "unigram entropy (nats)", "distinct-3")):
        for penalty in sorted({q["freq_penalty"] for q in results["quality"] if q["k"]}):
            rows = [q for q in results["quality"] if q["k"] and q["freq_penalty"] == penalty]
            ax.plot([q["k"] for q in rows], [q[key] for q in rows], "o-",
                    label="student" + (f", penalty {penalty:g}" if penalty else ""))
        ax.axhline(teacher[key], color="k", linestyle="--", label="AR teacher")
        ax.set(xlabel="k (tokens per pass)", xticks=ks, title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    paths = {"quality_vs_k": save_figure(fig, out / "quality_vs_k.png")}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for a in results["agreement"]:
        ax.plot(range(1, a["k"] + 1), a["per_offset"], "o-", label=f"k={a['k']} (exact {a['exact_match']:.2f})")
    ax.set(xlabel="offset in the window", ylabel="agreement with the AR teacher", ylim=(0, 1.02),
           xticks=range(1, max(ks) + 1), title="coupled agreement (same u)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths["agreement"] = save_figure(fig, out / "agreement.png")
    if results.get("speed"):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name in dict.fromkeys(s["decoder"] for s in results["speed"]):
            rows = [s for s in results["speed"] if s["decoder"] == name]
            ax.plot([s["batch"] for s in rows], [s["tokens_per_s"] for s in rows], "o-",
                    label="AR" if name == "AR" else f"K-Forcing {name}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="batch size", ylabel="tokens / s", title=f"decode throughput ({results['machine']['device']})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        paths["throughput"] = save_figure(fig, out / "throughput.png")
    return paths


__all__ = ["agreement_table", "plot_push_forward", "push_forward_tables", "targets_table"]
