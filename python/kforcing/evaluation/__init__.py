"""Evaluation: the measurements every student's evaluation is made of, and the tables shared by reports.

    metrics          perplexity, text statistics, sample quality, agreement of token windows, interleaved timing
    report_tables    Markdown table and plot helpers shared by the reports

What is measured for each kind of student is in its package (`kforcing.students.*.evaluate`), and `kforcing eval`
itself in `kforcing.workflows.evaluate`. Imports teachers/, models/ and below.
"""
