"""The `kforcing` command and its demo.

    commands   argparse subcommands: train-teacher, distill, eval, sample, demo
    demo       the whole pipeline with profiles (`kforcing demo`)

`python -m kforcing.cli` runs the same `main` as the installed `kforcing` entry point.
"""

from .commands import HelpFormatter, build_parser, main

__all__ = ["HelpFormatter", "build_parser", "main"]
