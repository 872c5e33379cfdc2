"""bf16 decode weights: what they cost in held-out perplexity and what they buy in AR decode speed, on a trained
teacher.

`kforcing.models.transformer.cast_linear_weights(model, torch.bfloat16)` stores every linear layer's weight in bf16
(half the bytes a decode step reads) and keeps embeddings, norms, activations and the KV cache in fp32. This script
compares the fp32 teacher with its bf16-weight copy:
  perplexity   exp(mean next-token NLL) over --windows held-out windows of --seq-len tokens (the teacher run's
               validation split), computed with full forward passes;
  AR speed     generate_ar of --new-tokens tokens after a --prompt-len prompt at each --batch size, the two models
               interleaved over --repeats rounds (medians; the ratio is what to read on a shared machine).

Example:
  python bench/bench_weight_dtype.py --ckpt runs/teacher
"""

import copy
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kforcing.checkpoints.checkpoint import RunLayout  # noqa: E402
from kforcing.workflows.loading import load_model  # noqa: E402
from kforcing.data import find_token_cache  # noqa: E402
from kforcing.decoding.generate import generate_ar  # noqa: E402
from kforcing.evaluation.metrics import time_interleaved  # noqa: E402
from kforcing.models.transformer import cast_linear_weights  # noqa: E402


@torch.no_grad()
def heldout_perplexity(model, dataset, windows, seq_len, batch_size):
    total, count = 0.0, 0
    for step in range(math.ceil(windows / batch_size)):
        ids, targets = dataset.batch("val", step, min(batch_size, windows - step * batch_size), seq_len, seed=0)
        logits = model(ids).double()
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a trained teacher: a run directory or checkpoint")
    parser.add_argument("--data-dir", default=None, help="its token cache (default: the run's data/ directory)")
    parser.add_argument("--windows", type=int, default=256, help="held-out windows for the perplexity")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: max_seq_len - 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="AR decode batch sizes")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=96, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per speed measurement")
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    teacher, tokenizer, _ = load_model(args.ckpt, device=device)
    dataset = find_token_cache([args.data_dir] if args.data_dir else [RunLayout(Path(args.ckpt)).data], tokenizer)
    if dataset is None:
        parser.error(f"no token cache made with the teacher's tokenizer under {args.ckpt}/data; pass --data-dir")
    bf16 = cast_linear_weights(copy.deepcopy(teacher), torch.bfloat16)
    models = {"float32": teacher, "bfloat16": bf16}
    seq_len = args.seq_len or teacher.config.max_seq_len - 1

    rows = []
    ppl = {name: heldout_perplexity(m, dataset, args.windows, seq_len, args.batch_size) for name, m in models.items()}
    for batch in args.batch:
        prompts = torch.randint(0, teacher.config.vocab_size, (batch, args.prompt_len)).tolist()
        runs = {name: (lambda m=m: generate_ar(m, prompts, args.new_tokens, seed=0)) for name, m in models.items()}
        measured = time_interleaved(runs, device, args.repeats)
        fp32_times = measured["float32"][0]
        for name, (times, _) in measured.items():
            rows.append({"weights": name, "batch": batch, "perplexity": ppl[name],
                         "ppl_vs_fp32": ppl[name] / ppl["float32"],
                         "tokens_per_s": batch * args.new_tokens / statistics.median(times),
                         "speed_vs_fp32": statistics.median(f / t for f, t in zip(fp32_times, times))})
            print(rows[-1], flush=True)
    columns = [("weights", "linear weights", "{}"), ("batch", "batch", "{}"),
               ("perplexity", "held-out perplexity", "{:.3f}"), ("ppl_vs_fp32", "vs fp32", "{:.4f}x"),
               ("tokens_per_s", "AR tokens/s", "{:.0f}"), ("speed_vs_fp32", "AR speed vs fp32", "{:.2f}x")]
    table = common.markdown_table(rows, columns)
    note = (f"Teacher {args.ckpt} ({teacher.num_params() / 1e6:.1f}M parameters, {teacher.config.n_layer} layers x "
            f"{teacher.config.n_embd}); perplexity over {args.windows} held-out windows of {seq_len} tokens; AR: "
            f"{args.new_tokens} tokens after {args.prompt_len}, {args.repeats} interleaved rounds.")
    common.report("weight_dtype", device, rows, f"{table}\n\n{note}", args.no_save)


if __name__ == "__main__":
    main()
