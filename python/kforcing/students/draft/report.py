"""Tables and plots of a draft student's evaluation (`kforcing.students.draft.evaluate`): results as data in, Markdown
and PNG out, as `kforcing.workflows.report` does for push-forward students."""

from pathlib import Path
from typing import Dict, List

from ...evaluation.report_tables import fmt, pyplot, quality_table, row, save_figure, speed_table
from ...evaluation.report_tables import targets_table as shared_targets_table

_TARGET_NAMES = {"tokens_per_pass": "verified tokens per pass", "exact": "verified output equals AR sampling",
                 "accept_2_floor": "acceptance at offset 2 vs the u-blind floor",
                 "entropy_rel": "unverified samples: relative entropy gap to the teacher's",
                 "ppl_ratio": "unverified samples: PPL / PPL of the teacher's samples",
                 "repeat_ratio": "unverified samples: longest repeat / the teacher's"}


def sampling_text(results: Dict) -> str:
    """The sampling settings of a draft evaluation, in words."""
    s = results["sampling"]
    return (f"temperature {s['temperature']:g}, top-k {s['top_k'] or 'off'}, "
            f"top-p {s['top_p'] if s['top_p'] < 1 else 'off'}")


def verified_table(results: Dict) -> str:
    settings, max_k = results["settings"], max(results["ks"])
    diag = results["diagnostics"]
    shuffle = "; u-shuffle feeds the hint rows another seed's uniforms" if diag["shuffle"] is not None else ""
    lines = [f"{settings['num_samples']} prompts x {settings['sample_len']} tokens, {sampling_text(results)}. "
             "Accepted at offset j: the share of verification steps whose drafts 2..j all equal the teacher's tokens. "
             f"The u-blind floor ({diag.get('floor_windows', '?')} held-out windows) drafts from the teacher's own "
             f"distribution with independent uniforms{shuffle}.\n",
             row(["decoding", "k", "tokens per pass", "equals AR"] + [f"offset {j}" for j in range(2, max_k + 1)]),
             "|" + "---|" * (3 + max_k)]
    for v in results["verified"]:
        cells = [fmt(a) for a in v["accepted"]] + [""] * (max_k - v["k"])
        lines.append(row(["verified", str(v["k"]), fmt(v["tokens_per_pass"], 2), "yes" if v["equals_ar"] else
                           "NO"] + cells))
    adaptive = results.get("verified_adaptive")
    if adaptive:  # drafts up to max_k - 1 tokens a round, or none: no per-offset rate; its choice depends on the batch
        lines.append(row([f"verified, adaptive (batches of {settings['batch_size']})", f"<= {results['student_max_k']}",
                          fmt(adaptive["tokens_per_pass"], 2),
                          "yes" if adaptive["equals_ar"] else "NO"] + [""] * (max_k - 1)))
    if diag["shuffle"] is not None:  # a chain student has no hint rows to feed other uniforms
        lines.append(row(["u-shuffle", str(diag["k"]), fmt(diag["shuffle_tokens_per_pass"], 2), "-"]
                          + [fmt(a) for a in diag["shuffle"]]))
    floor_tpp = 1 + sum(diag["floor"])
    lines.append(row(["u-blind floor", str(diag["k"]), f"{floor_tpp:.2f} (predicted)", "-"]
                      + [fmt(a) for a in diag["floor"]]))
    return "\n".join(lines)


def targets_table(results: Dict) -> str:
    """The draft student's targets (`kforcing.students.draft.evaluate.DRAFT_TARGETS`)."""
    return shared_targets_table(results, _TARGET_NAMES)


def draft_tables(results: Dict) -> str:
    parts = ["### Verified decoding (lossless) and its diagnostics\n\n" + verified_table(results),
             "### Unverified samples against the teacher's (no penalty)\n\n" + quality_table(results)]
    if results.get("speed"):
        parts.append("### Decode speed\n\n" + speed_table(results))
    parts.append(f"### Targets at k={results['targets']['k']}\n\n" + targets_table(results))
    return "\n\n".join(parts) + "\n"


def plot_draft(results: Dict, out: Path, prefix: str = "") -> Dict[str, Path]:
    """acceptance.png (per offset: verified, u-shuffle, u-blind floor) and, with a benchmark, throughput.png, in
    `out` (file names start with `prefix`)."""
    plt = pyplot()
    diag = results["diagnostics"]
    verified = next(v for v in results["verified"] if v["k"] == diag["k"])
    offsets = list(range(2, diag["k"] + 1))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for values, label, style in ((verified["accepted"], "draft student", "o-"), (diag["shuffle"], "u-shuffle", "s--"),
                                 (diag["floor"], "u-blind floor", "k:")):
        if values is not None:
            ax.plot(offsets, values, style, label=label)
    ax.set(xlabel="draft offset j", ylabel="drafts 2..j all accepted", ylim=(0, 1.02), xticks=offsets,
           title=f"verified decoding, k={diag['k']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths = {"acceptance": save_figure(fig, out / f"{prefix}acceptance.png")}
    if results.get("speed"):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name in dict.fromkeys(s["decoder"] for s in results["speed"]):
            rows = [s for s in results["speed"] if s["decoder"] == name]
            ax.plot([s["batch"] for s in rows], [s["tokens_per_s"] for s in rows], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="tokens / s", title=f"decode throughput ({results['machine']['device']})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        paths["throughput"] = save_figure(fig, out / f"{prefix}throughput.png")
    return paths


def draft_summary_lines(draft: Dict) -> List[str]:
    """The demo summary's headline: the draft student (`kforcing distill`'s default) decoding verified, adaptively
    (the default of `kforcing sample --verify`) and at k, and unverified at k, beside AR: tokens per round, speed
    against AR at every batch size measured, and sample quality under the teacher."""
    results, stage = draft["eval"], draft["stages"][-1]
    k = max(results["ks"])
    verified = next(v for v in results["verified"] if v["k"] == k)
    quality = {q["k"]: q for q in results["quality"]}
    speed = {(s["decoder"], s["batch"]): s for s in results.get("speed", [])}
    floor = results["diagnostics"]["floor"]
    columns = ["verified adaptive", f"verified k={k}", f"unverified k={k}", "AR"]
    width = 26

    def line(label, cells):
        return (f"{label:{width}}" + "".join(f"{cell:>12}" for cell in cells)).rstrip()

    adaptive = results.get("verified_adaptive")  # results written before it existed lack it
    # Adaptive drafting's tokens per round depend on the batch (it drafts less in larger ones): the decode benchmark's
    # batch-1 run says what a single request gets.
    alone = speed.get(("verified adaptive", 1))
    adaptive_tokens = f"{results['speed_tokens'] / alone['passes']:.2f}" if alone else "-"
    lines = [f"default student: a draft student on the frozen teacher ({stage['step']} steps, "
             f"{sampling_text(results)})",
             line("", ["verified", "verified", "unverified", "AR"]), line("", ["adaptive", f"k={k}", f"k={k}", ""]),
             line("tokens per round (b1)", [adaptive_tokens, f"{verified['tokens_per_pass']:.2f}", f"{float(k):.2f}",
                                            "1.00"]),
             line("equals AR sampling", [("yes" if adaptive["equals_ar"] else "NO") if adaptive else "-",
                                         "yes" if verified["equals_ar"] else "NO", "-", "-"])]
    for batch in sorted({batch for _, batch in speed}):
        cells = [f"{speed[(name, batch)]['speedup']:.2f}x" if (name, batch) in speed else "-" for name in columns]
        lines.append(line(f"speed vs AR (batch {batch})", cells))
    if ("AR", 1) in speed:
        lines.append(line("tokens/s (batch 1)", [f"{speed[(name, 1)]['tokens_per_s']:.0f}" if (name, 1) in speed
                                                 else "-" for name in columns]))
    for key, label in (("ppl_teacher", "PPL under teacher"), ("unigram_entropy", "unigram entropy"),
                       ("longest_repeat_mean", "longest repeat (mean)")):
        same = f"{quality[0][key]:.2f}"
        lines.append(line(label, [same, same, f"{quality[k][key]:.2f}", same]))
    lines.append(f"{'acceptance offsets 2..k':{width}}" + " / ".join(f"{a:.2f}" for a in verified["accepted"])
                 + "   (u-blind floor " + " / ".join(f"{a:.2f}" for a in floor) + ")")
    return lines


__all__ = ["draft_summary_lines", "draft_tables", "plot_draft", "sampling_text", "targets_table", "verified_table"]
