"""Workflows: the library's jobs over any kind of student, which they find through `kforcing.students.registry`.

    loading    load_model: a checkpoint or run of any kind (a draft student with its teacher), or "hf:PATH"
    distill    `kforcing distill`: flags, run directory, teacher, data; the kind trains its stages
    evaluate   `kforcing eval`: models, held-out data, sampling settings; the kind measures
    report     eval reports in the kind's layout, and the demo's report

Imports students/ and below.
"""
