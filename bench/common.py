"""Shared benchmark plumbing: timing (CPU Timer / CUDA events with cold L2), run metadata, tables, JSON.

Every benchmark reports ratios measured side by side in one run: absolute times on a shared machine are noise.
"""

import argparse
import ctypes
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch.utils import benchmark as tbench

from kforcing.cli.commands import HelpFormatter
from kforcing.runtime import git_sha, resolve_device  # noqa: F401  (the benchmarks resolve --device with it)

RESULTS = Path(__file__).resolve().parent / "results"
L2_FLUSH_FACTOR = 3  # rotate through enough input sets to cover this many L2 caches


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def metadata(device):
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "git_sha": git_sha(RESULTS) or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def percentiles(times):
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(round(q * (len(times) - 1))))]  # noqa: E731
    return {"median": statistics.median(times), "p20": pick(0.2), "p80": pick(0.8)}


def time_cpu(fn, min_run_time):
    """Median/p20/p80 seconds per call, with torch.utils.benchmark.Timer."""
    measurement = tbench.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return percentiles(measurement.times)


def time_cuda(make_inputs, fn, bytes_per_call, min_run_time, blocks=15):
    """Median/p20/p80 seconds per call with CUDA events, rotating input sets so that the L2 is cold.

    make_inputs() returns one set of arguments; fn(*args) runs the op.
    """
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    sets = [make_inputs() for _ in range(max(1, min(64, math.ceil(L2_FLUSH_FACTOR * l2 / max(bytes_per_call, 1)))))]
    for args in sets[:3]:
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(*sets[0])
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end) / 1e3, 1e-6)
    calls = max(len(sets), int(min_run_time / blocks / per_call))
    times = []
    for _ in range(blocks):
        start.record()
        for i in range(calls):
            fn(*sets[i % len(sets)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return percentiles(times)


def compare(device, make_inputs, impls, bytes_per_call, min_run_time, rounds=5):
    """Times the implementations {name: fn} on the same kind of inputs, interleaved.

    Each of `rounds` rounds times every implementation once in turn (after one warm-up call each), so a change in
    the machine's load hits them all alike. Returns ({name: median/p20/p80 over the rounds' per-call seconds},
    {name: median over rounds of time(name) / time(first implementation)}).
    """
    def measure(fn):
        if device.type == "cuda":
            return time_cuda(make_inputs, fn, bytes_per_call, min_run_time / rounds)["median"]
        return time_cpu(lambda args=make_inputs(): fn(*args), min_run_time / rounds)["median"]

    for fn in impls.values():
        fn(*make_inputs())
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            times[name].append(measure(fn))
    first = times[next(iter(impls))]
    ratios = {name: statistics.median(t / f for t, f in zip(values, first)) for name, values in times.items()}
    return {name: percentiles(values) for name, values in times.items()}, ratios


def _status_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _track_cpu_memory_exactly():
    """Make glibc map every allocation above 128 KiB on its own and unmap it on free (no dynamic threshold), so
    the resident set follows live tensor memory and CPU peaks are exact rather than hidden by reused heap."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3 = M_MMAP_THRESHOLD
    except OSError:
        pass  # not glibc: CPU peaks may read low when freed memory is reused


_track_cpu_memory_exactly()


def peak_memory(device, fn):
    """Extra bytes at the peak while fn() runs.

    CUDA: the caching allocator's peak above what was allocated before. CPU (Linux): the process's peak resident
    set (VmHWM, reset through /proc/self/clear_refs) above its resident set before; CPU tensors have no allocator
    statistics, and large CPU allocations are mapped and unmapped, so this tracks what fn() allocates.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [(fmt.format(row[key]) if row.get(key) is not None else "-") for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(name, device, rows, table, extra=None, meta=None):
    """Adds this run to bench/results/<name>_<device>/ as <date>_<sha>.json (every number) and <date>_<sha>.md
    (the table the run printed), and regenerates that folder's index.md. Earlier runs are never overwritten;
    returns the paths written. meta: `metadata(device)` taken when a long run started (the code it ran), rather
    than now, after commits may have moved the checkout on."""
    meta = meta or metadata(device)
    folder = RESULTS / f"{name}_{'cuda' if device.type == 'cuda' else 'cpu'}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date'][:19].replace(':', '')}_{meta['git_sha']}"
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps({"meta": meta, **(extra or {}), "rows": rows}, indent=2) + "\n")
    md_path.write_text(f"# {name} on {meta['device']}\n\ntorch {meta['torch']}, git {meta['git_sha']}, "
                       f"{meta['date']}.\n\n{table}\n")
    return json_path, md_path, write_index(folder)


def write_index(folder: Path) -> Path:
    """index.md of a results folder: one line per run, newest first (the single-file result of the layout before
    this one, <folder>.json/.md beside the folder, is listed too)."""
    runs = [(json.loads(path.read_text())["meta"], path.with_suffix(".md").name) for path in folder.glob("*.json")]
    legacy = folder.with_suffix(".json")
    if legacy.is_file():
        runs.append((json.loads(legacy.read_text())["meta"], f"../{legacy.with_suffix('.md').name}"))
    lines = [f"# {folder.name}: every run, newest first\n", "| date | git | device | torch | table |",
             "|---|---|---|---|---|"]
    for meta, table in sorted(runs, key=lambda run: run[0]["date"], reverse=True):
        lines.append(f"| {meta['date']} | {meta['git_sha']} | {meta['device']} | {meta['torch']} "
                     f"| [{table}]({table}) |")
    index = folder / "index.md"
    index.write_text("\n".join(lines) + "\n")
    return index


def report(name, device, results, text, no_save):
    """Prints the Markdown and, unless no_save, adds the run to bench/results/<name>_<device>/."""
    print()
    print(text)
    if not no_save:
        for path in save(name, device, results, text):
            print(f"wrote {path}")


def report_table(name, device, rows, columns, settings, meta, no_save):
    """Prints the rows as a Markdown table (`markdown_table`) and, unless no_save, adds the run to
    bench/results/<name>_<device>/ with its settings (the command that made it among them)."""
    table = markdown_table(rows, columns)
    print()
    print(table)
    if not no_save:
        for path in save(name, device, rows, table, extra={"settings": settings}, meta=meta):
            print(f"wrote {path}")


def command_line(script, argv):
    """The command that ran `script` with `argv` (sys.argv's when None), as settings record it."""
    return " ".join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])])


def base_parser(description):
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run; auto = cuda when available")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--no-save", action="store_true", help="print the table only; write nothing to bench/results")
    return parser


def fmt_time(stats):
    scale, unit = (1e3, "ms") if stats["median"] >= 1e-3 else (1e6, "us")
    return f"{stats['median'] * scale:.3g} {unit} [{stats['p20'] * scale:.3g}, {stats['p80'] * scale:.3g}]"
