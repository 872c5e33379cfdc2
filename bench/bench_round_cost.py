"""The cost model of decoding: what one round of every decoding design costs, in AR steps, on one machine, in one run.

A decoding round's cost at small batch is, to first order, the weight bytes it reads. This script measures it for
every design, with random weights (cost does not depend on training; acceptance does, and comes from trained
students: `kforcing eval`), at each preset and batch size:

  AR             generate_ar: one teacher row per sequence per step
  push-forward   generate_kforcing on a PushForwardLM at k: k committed rows and k hint rows, k tokens a pass
  a. trunk       a draft student, trunk pathway with full-copy adapters (distill's former default): a verify
                 pass of k rows, then a second pass of [exact | k-2 hints] through every block; also with rank-32
                 LoRA adapters (the second pass reads the teacher's weights again, plus the LoRAs)
  b. onepass     a draft student, onepass pathway with rank-32 LoRAs: one teacher call over the k verify rows and
                 k hint sets of k-1 rows (one per number of drafts that may stand), k + k(k-1) rows in all
  c. head        a draft student, head pathway with one block: a verify pass, the head over the k committed rows,
                 then one head pass of [exact | k-1 hints] drafting k-1 tokens jointly from their uniforms
  d. chain       a draft student, chain pathway with one block: a verify pass of k rows, then k-1 head calls,
                 each drafting one token from the head's distribution with its own uniform; also at k = 2, with
                 a draft vocabulary of V/8 tokens (the drafts' LM head reads an eighth of the bytes), and with
                 the head's linear weights and readout stored in bf16 (`cast_linear_weights(head, bf16)`: half
                 its bytes; drafts only propose, so verification stays exact)

Draft designs are timed verified with k pinned (static shapes: a round costs the same whatever is accepted).
With --compile every design runs torch.compile'd, AR's step included (`compile=True` of each decoder: the step or
the whole drafting round as one graph); the warm-up call of each compiles it before the timed rounds.
Each measurement is a whole generate call (prefill included) divided by its passes; calls are interleaved
(`kforcing.evaluation.metrics.time_interleaved`), so load spikes hit every design alike. "AR steps/round" is the
design's ms per round over AR's ms per step in the same run. "weights/round" counts the weight bytes one round's calls
read, each matrix once per call that reads it, over an AR step's (embedding gathers and KV caches left out): what the
round would cost if it were purely weight-bound.

Tokens per round of a trained student divided by its AR steps per round is its speedup over AR.

Examples:
  python bench/bench_round_cost.py                           # tiny, small and base; batch 1, 8, 32
  python bench/bench_round_cost.py --preset small --batch 1 --profile
  python bench/bench_round_cost.py --preset tiny small --compile   # every decoder compiled
  python bench/bench_round_cost.py --preset small --compile --only "a." "b." "d. chain k=4, V/8"
"""

import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kforcing.students.draft.decode import generate_with_drafts  # noqa: E402
from kforcing.decoding.generate import generate_ar, generate_kforcing  # noqa: E402
from kforcing.students.draft.student import DraftStudent, HeadConfig  # noqa: E402
from kforcing.evaluation.metrics import time_interleaved  # noqa: E402
from kforcing.models.transformer import ARModel, ModelConfig, PRESETS, cast_linear_weights  # noqa: E402
from kforcing.students.push_forward.model import PushForwardLM  # noqa: E402


def matrix_bytes(module) -> int:
    """Bytes of the weights a call of `module` reads: every parameter except embedding tables (gathered by row)."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in embeddings)


def round_weight_bytes(design, teacher, student, k) -> int:
    """Weight bytes one round of `design` reads (module docstring)."""
    blocks = sum(matrix_bytes(block) for block in teacher.blocks)
    readout = matrix_bytes(teacher.lm_head) + matrix_bytes(teacher.norm)
    teacher_pass = blocks + readout
    if design == "AR":
        return teacher_pass
    if design.startswith("push-forward"):
        return matrix_bytes(student)
    head = student.head
    if design.startswith("a."):  # verify, then the teacher's blocks for the exact row and the copies (or LoRAs)
        return 2 * teacher_pass + matrix_bytes(head)
    if design.startswith("b."):  # one call: the teacher's weights and the LoRAs, read once
        return teacher_pass + matrix_bytes(head)
    if design.startswith("c."):  # verify, the head over committed rows, the head's draft pass and its readout
        head_blocks = sum(matrix_bytes(block) for block in head.blocks)
        return teacher_pass + 2 * head_blocks + matrix_bytes(head.noise) + matrix_bytes(head.norm) + readout
    # d. chain: verify, then a head call per draft (the first also reads the committed rows), each with the readout
    # (the LM head's draft-vocabulary rows only, with a draft vocabulary)
    drafts = int(design.split("k=")[1].split(",")[0]) - 1
    vocab = head.config.draft_vocab or teacher.config.vocab_size
    lm_head = teacher.lm_head.weight
    draft_readout = (matrix_bytes(teacher.norm) + lm_head.numel() * head.weight_dtype.itemsize * vocab
                     // teacher.config.vocab_size)
    return teacher_pass + drafts * (matrix_bytes(head) + draft_readout)


def designs(teacher, k, compile=False):
    """{name: (student, decode(prompts, new_tokens))} of every design at k, each compiled with `compile`."""
    push_forward = PushForwardLM.from_teacher(teacher, k).eval()
    trunk = DraftStudent.from_teacher(teacher, HeadConfig(max_k=k, pathway="trunk", adapter_rank=0)).eval()
    trunk_lora = DraftStudent.from_teacher(teacher, HeadConfig(max_k=k, pathway="trunk", adapter_rank=32)).eval()
    one_pass = DraftStudent.from_teacher(teacher, HeadConfig(max_k=k, pathway="onepass", adapter_rank=32)).eval()
    head = DraftStudent.from_teacher(teacher, HeadConfig(num_layers=1, max_k=k, pathway="head")).eval()
    chain = DraftStudent.from_teacher(teacher, HeadConfig(num_layers=1, max_k=k, pathway="chain")).eval()
    small_vocab = teacher.config.vocab_size // 8
    chain_vocab = DraftStudent.from_teacher(teacher, HeadConfig(num_layers=1, max_k=k, pathway="chain",
                                                                draft_vocab=small_vocab)).eval()
    chain_bf16, chain_vocab_bf16 = (DraftStudent(teacher, cast_linear_weights(copy.deepcopy(s.head), torch.bfloat16))
                                    for s in (chain, chain_vocab))

    def drafting(student, rows=k):
        return lambda prompts, n: generate_with_drafts(student, prompts, n, k=rows, seed=0, compile=compile)

    return {
        "AR": (teacher, lambda prompts, n: generate_ar(teacher, prompts, n, seed=0, compile=compile)),
        f"push-forward k={k}": (push_forward, lambda prompts, n: generate_kforcing(push_forward, prompts, n, k=k,
                                                                                   seed=0, compile=compile)),
        f"a. trunk k={k}": (trunk, drafting(trunk)),
        f"a. trunk k={k}, LoRA 32": (trunk_lora, drafting(trunk_lora)),
        f"b. onepass k={k}, LoRA 32": (one_pass, drafting(one_pass)),
        f"c. head k={k}": (head, drafting(head)),
        f"d. chain k={k}": (chain, drafting(chain)),
        "d. chain k=2": (chain, drafting(chain, 2)),
        f"d. chain k={k}, draft vocab V/8": (chain_vocab, drafting(chain_vocab)),
        f"d. chain k={k}, bf16 head": (chain_bf16, drafting(chain_bf16)),
        f"d. chain k={k}, V/8, bf16 head": (chain_vocab_bf16, drafting(chain_vocab_bf16)),
    }


def profile_round(teacher, k, batch, args):
    """Print where a chain round's time goes (torch.profiler, CPU ops), beside an AR call's."""
    prompts = torch.randint(0, teacher.config.vocab_size, (batch, args.prompt_len)).tolist()
    for name, (_, decode) in designs(teacher, k, args.compile).items():
        if name != "AR" and not name.startswith("d."):
            continue
        decode(prompts, args.new_tokens)
        with torch.profiler.profile() as prof:
            out = decode(prompts, args.new_tokens)
        print(f"\n{name}: {out.num_passes} passes")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["tiny", "small", "base"], choices=sorted(PRESETS),
                        help="model presets")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    parser.add_argument("--k", type=int, default=4, help="tokens per round of the drafting designs")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per design")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every design's step or round, AR's included (minutes of compilation)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                        help="time only the designs whose names start with one of these (e.g. 'b.' 'd. chain k=4'); "
                        "AR is always timed, as the baseline")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile AR and the chain design at the first preset and batch size")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="kforcing_ops.*reference", category=RuntimeWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    meta = common.metadata(device)
    print(f"{common.device_name(device)}, torch {torch.__version__}", flush=True)
    rows = []
    for preset in args.preset:
        torch.manual_seed(0)
        teacher = ARModel(ModelConfig.from_preset(preset)).to(device).eval()
        if args.profile:
            profile_round(teacher, args.k, args.batch[0], args)
            return
        candidates = {name: design for name, design in designs(teacher, args.k, args.compile).items()
                      if name == "AR" or args.only is None or name.startswith(tuple(args.only))}
        ar_bytes = round_weight_bytes("AR", teacher, None, args.k)
        for batch in args.batch:
            prompts = torch.randint(0, teacher.config.vocab_size, (batch, args.prompt_len)).tolist()
            runs = {name: (lambda decode=decode: decode(prompts, args.new_tokens))
                    for name, (_, decode) in candidates.items()}
            measured = time_interleaved(runs, device, args.repeats)
            ar_ms = 1e3 * statistics.median(measured["AR"][0]) / measured["AR"][1].num_passes
            for name, (times, out) in measured.items():
                ms = 1e3 * statistics.median(times) / out.num_passes
                row = {"preset": preset, "batch": batch, "design": name, "rounds": out.num_passes, "ms_per_round": ms,
                       "ar_steps_per_round": ms / ar_ms,
                       "weights_per_round": round_weight_bytes(name, teacher, candidates[name][0], args.k) / ar_bytes}
                rows.append(row)
                print(f"{preset:5s} batch {batch:3d} {name:20s}: {ms:8.2f} ms/round, {row['ar_steps_per_round']:.2f} "
                      f"AR steps, weights {row['weights_per_round']:.2f}x AR's", flush=True)
    columns = [("preset", "preset", "{}"), ("batch", "batch", "{}"), ("design", "design", "{}"),
               ("ms_per_round", "ms/round", "{:.2f}"), ("ar_steps_per_round", "AR steps/round", "{:.2f}"),
               ("weights_per_round", "weights/round vs AR", "{:.2f}x")]
    settings = {"k": args.k, "compile": args.compile, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "threads": torch.get_num_threads(),
                "command": common.command_line("bench_round_cost.py", argv)}
    common.report_table("round_cost", device, rows, columns, settings, meta, args.no_save)

if __name__ == "__main__":
    main()
