"""Checkpoints and loading: the on-disk format, run folders, provenance, and loading any model by its path.

    checkpoint         save/load (checksummed, atomic), RunLayout (a run folder), Provenance, build_model
    draft_checkpoint   saving and loading a draft student with a reference to its teacher
    loading            load_model: a checkpoint or run, a draft student with its teacher, or "hf:PATH"

Imports decoding/ and below never; students/, teachers/, models/ and the foundations.
"""
