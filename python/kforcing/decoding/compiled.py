"""torch.compile'd decoding steps and rounds, compiled once per process.

A decoding loop calls the same step (AR's one-row pass, a push-forward pass, a draft student's drafting round) with
the same shapes again and again, mutating its caches in place: compiled with static shapes, its Python and
dispatch overhead goes, which at small batch on a CPU is a large share of a step (about a third of the small
preset's AR step). `compiled(fn)` keeps one compiled version of each module-level function (or class function
called with its instance first) for the whole process, so that every generate call with the shapes seen before
reuses the code instead of recompiling.

A graph's shapes include its caches', so a compiled decoder sizes its caches (and uniform tables) with
`static_length`: the request's length rounded up to a multiple of LENGTH_BUCKET, so that requests of nearby prompt
lengths and draft counts share graphs (the kernels read each sequence's rows up to its length only: a longer
cache costs memory, not time).

Each batch size, draft count and sampling setting is a graph of its own (static shapes, and the settings are
constants of the graph), so a process that serves several of them needs more graphs per function than dynamo's
default of 8 (past it dynamo silently runs the function eagerly): `compiled` raises that limit to
`GRAPHS_PER_STEP`.
"""

import torch

# Options of torch.compile for compiled steps (e.g. {"backend": "aot_eager"} to trace without code generation).
COMPILE_OPTIONS = {}
GRAPHS_PER_STEP = 64
LENGTH_BUCKET = 64
_compiled_steps = {}


def compiled(fn):
    """The torch.compile'd `fn` (static shapes), one per function and COMPILE_OPTIONS in the process."""
    key = (fn, repr(sorted(COMPILE_OPTIONS.items())))
    if key not in _compiled_steps:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, GRAPHS_PER_STEP)
        _compiled_steps[key] = torch.compile(fn, dynamic=False, **COMPILE_OPTIONS)
    return _compiled_steps[key]


def static_length(length: int) -> int:
    """A compiled decoder's cache length for a request needing `length` rows (module docstring)."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def compilations() -> int:
    """Graphs torch.compile has made in this process so far: a call that raised it compiled (its wall time is not
    the step's)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


__all__ = ["COMPILE_OPTIONS", "GRAPHS_PER_STEP", "LENGTH_BUCKET", "compilations", "compiled", "static_length"]
