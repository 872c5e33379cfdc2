"""Checkpoints: the on-disk format, run folders, provenance, and AR teachers' checkpoints.

    checkpoint   save/load (checksummed, atomic), RunLayout (a run folder), Provenance, load_built_model

Each student kind's checkpoint format is in its package; `kforcing.workflows.loading.load_model` loads any of them
by its path. Imports teachers/, models/ and the foundations.
"""
