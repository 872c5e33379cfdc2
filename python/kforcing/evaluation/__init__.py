"""Evaluation: metrics, `kforcing eval`, and the report tables and plots made from its results.

    metrics          pure metrics: coupled agreement, perplexity, text statistics, interleaved decode speed
    evaluate         run_eval: every table of `kforcing eval` for a push-forward or draft student, as results data
    evaluate_draft   the draft student's rows: acceptance, verified/unverified speed and quality against AR
    report           Markdown and plots from results (eval reports, the demo report)
    report_draft     the draft student's report sections
    report_tables    table and plot helpers shared by the reports

Imports checkpoints/, decoding/ and below.
"""
