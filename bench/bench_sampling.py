"""Benchmark inverse_cdf_sample against the compositions it replaces.

Compared side by side, per (N, V):
  kernel        kforcing_ops.inverse_cdf_sample
  descending    kforcing_ops.inverse_cdf_sample(order="descending"): the CDF walks tokens by descending probability
  composition   softmax -> float64 cumsum -> searchsorted (the "reference composition")
  compiled      torch.compile of the composition
  reference     kforcing_ops.reference.inverse_cdf_sample (the composition + the rule's edge cases)
  multinomial   softmax -> torch.multinomial (different semantics: it draws its own noise; speed only)
GB/s counts the logits read once. Implementations are timed interleaved, round by round, and the speedup is the
median of the per-round ratios. Writes bench/results/sampling_<device>.{json,md}.

Targets: CPU >= 3x faster than the composition at N=64, V=50257; GPU >= 70% of HBM bandwidth at
N >= 64, V = 131072.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kforcing_ops  # noqa: E402
from kforcing_ops import reference  # noqa: E402


def composition(logits, u):
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)
    return torch.searchsorted(cdf, u.double()[:, None]).squeeze(1)


def multinomial(logits, u):
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(1)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256], help="N: rows sampled per call")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 50257, 131072], help="V: vocabulary sizes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["descending", "compiled", "reference", "multinomial"],
                        help="baselines to leave out (compiled takes a while to warm up)")
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    torch._dynamo.config.recompile_limit = 64  # one compile per (N, V)
    compiled = torch.compile(composition, dynamic=False)
    impls = {"kernel": kforcing_ops.inverse_cdf_sample,
             "descending": lambda logits, u: kforcing_ops.inverse_cdf_sample(logits, u, order="descending"),
             "composition": composition, "compiled": compiled,
             "reference": reference.inverse_cdf_sample, "multinomial": multinomial}
    impls = {k: v for k, v in impls.items() if k not in args.skip}

    rows = []
    for n in args.rows:
        for v in args.vocab:
            make = lambda n=n, v=v: (torch.randn(n, v, device=device, dtype=dtype) * 3,  # noqa: E731
                                     torch.rand(n, device=device))
            nbytes = n * v * dtype.itemsize
            row = {"N": n, "V": v, "dtype": args.dtype}
            stats, ratios = common.compare(device, make, impls, nbytes, args.min_run_time)
            row.update(stats)
            row["GB/s"] = nbytes / row["kernel"]["median"] / 1e9
            row["speedup_vs_composition"] = ratios["composition"]
            rows.append(row)
            print(f"N={n} V={v}: kernel {common.fmt_time(row['kernel'])}, "
                  f"{row['speedup_vs_composition']:.1f}x the composition", flush=True)

    columns = [("N", "N", "{}"), ("V", "V", "{}"), ("dtype", "dtype", "{}")]
    columns += [(f"{name}_t", name, "{}") for name in impls]
    columns += [("GB/s", "kernel GB/s", "{:.1f}"), ("speedup_vs_composition", "kernel speedup vs composition",
                                                    "{:.1f}x")]
    shown = [dict(r, **{f"{name}_t": common.fmt_time(r[name]) for name in impls}) for r in rows]
    table = common.markdown_table(shown, columns)
    common.report("sampling", device, rows, table, args.no_save)


if __name__ == "__main__":
    main()
