"""Serving load test: vLLM's OpenAI server for a Hugging Face teacher, plain and with three speculative drafters.

For each row, `vllm serve` starts once (from vLLM's environment, --vllm-env; this script runs in kforcing's):
  AR           no speculative decoding
  ngram        prompt lookup, 3 drafts a step ({"method": "ngram", prompt_lookup 2..4})
  draft_model  a small causal LM of the same vocabulary (--draft-model), 3 drafts a step
  kforcing     the exported kforcing chain head (--drafter) as vLLM's "eagle" drafter, 3 drafts a step: the
               command line `kforcing serve --print-command` gives
Once /health answers, vLLM's own load generator (`vllm bench serve`: the random dataset tokenised with the
teacher's tokenizer, --ignore-eos so that every request makes --output-len tokens, a fixed --seed, temperature
--temperature) runs at each --concurrency C: --num-prompts requests (default max(8, 2C)), at most C in flight,
arriving at --request-rate (inf: all at once). The server's /metrics is read before and after each client run:
the spec-decode counters give the mean acceptance length, 1 + accepted / drafts (tokens per target step). Then
the server is killed (its whole process group) before the next row starts.

Reported per row and concurrency: output tokens/s and requests/s, TTFT and ITL p50/p99 (ITL is the gap between
streamed chunks: a speculative step that accepts drafts streams several tokens in one chunk), TPOT p50, the mean
acceptance length, and output tokens/s over the AR row's at the same concurrency. Rows run one after another, not
interleaved: on a shared machine, compare ratios, and rerun before trusting small differences.

Examples:
  python bench/bench_vllm_serving.py --teacher runs/serve/teacher --drafter runs/serve/drafter \\
      --draft-model runs/serve/draft --concurrency 1 4 16 64
  python bench/bench_vllm_serving.py --teacher T --drafter D --rows AR kforcing --concurrency 1 --no-save
"""

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROWS = ("AR", "ngram", "draft_model", "kforcing")
SPEC_COUNTERS = ("drafts", "draft_tokens", "accepted_tokens")
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}


def server_command(row, args, vllm, extra):
    """The `vllm serve` command line of a row (extra: the options every row shares)."""
    teacher = str(Path(args.teacher).resolve())
    if row == "kforcing":
        kforcing = Path(args.vllm_env) / "bin" / "kforcing"
        printed = subprocess.run([str(kforcing), "serve", "--teacher", teacher, "--drafter", args.drafter,
                                  "--num-speculative-tokens", str(args.num_speculative_tokens), "--print-command",
                                  "--", *extra], check=True, capture_output=True, text=True).stdout
        command = shlex.split(printed.strip().splitlines()[-1])
        return [*vllm, *command[1:]]  # "vllm" -> this environment's CLI
    spec = {"ngram": {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
                      "prompt_lookup_max": 4, "prompt_lookup_min": 2},
            "draft_model": {"method": "draft_model", "model": str(Path(args.draft_model or "").resolve()),
                            "num_speculative_tokens": args.num_speculative_tokens}}.get(row)
    return [*vllm, "serve", teacher, *extra, *(["--speculative-config", json.dumps(spec)] if spec else [])]


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_ready(process, base, timeout):
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before answering /health")
        try:
            http_get(f"{base}/health")
            return time.time() - start
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def spec_counters(base):
    """vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}_total from /metrics, summed over labels."""
    found = dict.fromkeys(SPEC_COUNTERS, 0.0)
    for line in http_get(f"{base}/metrics").splitlines():
        for name in SPEC_COUNTERS:
            if line.startswith(f"vllm:spec_decode_num_{name}_total"):
                found[name] += float(line.rsplit(" ", 1)[1])
    return found


def stop(process):
    """SIGTERM the server's process group (API server, engine core, workers), SIGKILL it after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for _ in range(100):  # then the children that outlived the leader, until the group is empty
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def run_client(args, vllm, base, concurrency, out_dir, row):
    """One `vllm bench serve` run; returns its saved JSON result."""
    counts = args.num_prompts or [max(8, 2 * c) for c in args.concurrency]
    prompts = counts[args.concurrency.index(concurrency)] if len(counts) > 1 else counts[0]
    name = f"{row}_c{concurrency}.json"
    command = [*vllm, "bench", "serve", "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
               "--model", str(Path(args.teacher).resolve()), "--dataset-name", "random",
               "--input-len", str(args.input_len), "--output-len", str(args.output_len),
               "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
               "--request-rate", str(args.request_rate), "--ignore-eos", "--seed", str(args.seed),
               "--temperature", str(args.temperature), "--num-warmups", str(args.num_warmups),
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
               "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    with open(out_dir / f"{row}_c{concurrency}_client.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=vllm_env())
    return json.loads((out_dir / name).read_text()), prompts, shown(command, vllm)


def vllm_cli(args):
    """(the command that runs vLLM's CLI in --vllm-env, vLLM's version). Not its `vllm` script, which vllm-cpu 0.32
    breaks, but kforcing's `python -m kforcing.serving.vllm_serve` (vLLM's CLI in-process; see its `vllm_cli`)."""
    cli = [str(Path(args.vllm_env) / "bin" / "python"), "-m", "kforcing.serving.vllm_serve"]
    probe = subprocess.run([*cli, "--version"], capture_output=True, text=True, env=vllm_env())
    if probe.returncode != 0:
        raise SystemExit(f"{shlex.join(cli)} --version failed:\n{probe.stderr[-3000:]}")
    return cli, probe.stdout.strip().splitlines()[-1]


def shown(command, vllm):
    """A vLLM command line as `vllm ...` (the CLI runs through kforcing's module)."""
    return shlex.join(["vllm", *command[len(vllm):]])


def vllm_env():
    return {**os.environ, **ENV, "PYTHONPATH": ""}


def bench_row(row, args, vllm, out_dir, results):
    """Start the row's server, run the client at each concurrency (appending to results), stop the server."""
    port = args.port
    base = f"http://127.0.0.1:{port}"
    extra = ["--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--seed", str(args.seed),
             "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(max(args.concurrency)),
             *(["--enforce-eager"] if args.enforce_eager else []), *shlex.split(args.server_args or "")]
    command = server_command(row, args, vllm, extra)
    print(f"[{row}] {shown(command, vllm)}", flush=True)
    log = open(out_dir / f"{row}_server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(),
                               start_new_session=True)
    try:
        startup = wait_ready(process, base, args.startup_timeout)
        print(f"[{row}] ready after {startup:.0f} s", flush=True)
        for concurrency in args.concurrency:
            before = spec_counters(base)
            start = time.time()
            result, prompts, client = run_client(args, vllm, base, concurrency, out_dir, row)
            after = spec_counters(base)
            delta = {name: after[name] - before[name] for name in SPEC_COUNTERS}
            accept = 1 + delta["accepted_tokens"] / delta["drafts"] if delta["drafts"] else None
            results.append({
                "row": row, "concurrency": concurrency, "prompts": prompts, "completed": result["completed"],
                "failed": result.get("failed", 0), "output_tokens": result["total_output_tokens"],
                "duration_s": result["duration"], "wall_s": time.time() - start,
                "output_tps": result["output_throughput"], "request_rps": result["request_throughput"],
                **{f"{metric}_{p}_ms": result.get(f"p{p}_{metric}_ms")
                   for metric in ("ttft", "itl", "tpot", "e2el") for p in (50, 99)},
                "acceptance_length": accept, "spec_counters": delta, "startup_s": startup,
                "server_command": shown(command, vllm), "client_command": client})
            r = results[-1]
            print(f"[{row}] C={concurrency:3d}: {r['output_tps']:7.1f} tok/s, {r['request_rps']:.2f} req/s, "
                  f"TTFT p50 {r['ttft_50_ms']:.0f} ms, ITL p50 {r['itl_50_ms']:.1f} ms, acceptance "
                  f"{'-' if accept is None else f'{accept:.2f}'}, {r['wall_s']:.0f} s", flush=True)
    finally:
        stop(process)
        log.close()


def check_inputs(args):
    teacher = Path(args.teacher)
    if not (teacher / "tokenizer.json").is_file():
        raise SystemExit(f"--teacher {teacher}: no tokenizer.json (vLLM and its client tokenise with it)")
    if not any((teacher / name).is_file() for name in ("tokenizer_config.json", "tokenizer.model")):
        # transformers' AutoTokenizer needs to be told the class of a bare tokenizer.json (e.g. one kforcing's
        # train_tokenizer saved): PreTrainedTokenizerFast, with the model's end-of-text token.
        eos = json.loads((teacher / "config.json").read_text()).get("eos_token_id")
        vocab = {v: k for k, v in json.loads((teacher / "tokenizer.json").read_text())["model"]["vocab"].items()}
        config = {**TOKENIZER_CONFIG, **({"eos_token": vocab[eos]} if eos in vocab else {})}
        (teacher / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {teacher / 'tokenizer_config.json'} (PreTrainedTokenizerFast)")
    if args.num_prompts and len(args.num_prompts) not in (1, len(args.concurrency)):
        raise SystemExit("--num-prompts takes one value, or one per --concurrency")
    needs = {"kforcing": args.drafter, "draft_model": args.draft_model}
    missing = [row for row in args.rows if row in needs and not needs[row]]
    if missing:
        raise SystemExit(f"rows {missing} need --drafter (kforcing) / --draft-model (draft_model)")


def describe_model(path):
    """One line about a Hugging Face folder: architecture, shape and parameter count."""
    from safetensors import safe_open

    config = json.loads((Path(path) / "config.json").read_text())
    params = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            params += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    shape = ", ".join(f"{key} {config[key]}" for key in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                          "num_attention_heads", "num_key_value_heads", "head_dim",
                                                          "vocab_size") if key in config)
    return f"`{path}`: {config.get('architectures', ['?'])[0]}, {shape}; {params / 1e6:.2f} M parameters"


def command_line(argv):
    """This run's command, quoted for a shell (common.command_line does not quote)."""
    return shlex.join(["python", "bench/bench_vllm_serving.py", *(sys.argv[1:] if argv is None else argv)])


COLUMNS = [("row", "row", "{}"), ("concurrency", "C", "{}"), ("prompts", "requests", "{}"),
           ("output_tps", "output tok/s", "{:.1f}"), ("request_rps", "req/s", "{:.2f}"),
           ("ttft_50_ms", "TTFT p50 ms", "{:.0f}"), ("ttft_99_ms", "TTFT p99 ms", "{:.0f}"),
           ("itl_50_ms", "ITL p50 ms", "{:.1f}"), ("itl_99_ms", "ITL p99 ms", "{:.1f}"),
           ("tpot_50_ms", "TPOT p50 ms", "{:.1f}"), ("acceptance_length", "acceptance length", "{:.2f}"),
           ("vs_ar", "tok/s vs AR", "{:.2f}x")]


def report_text(args, argv, rows, failures, meta, version, wall):
    """The Markdown report: setup, models, commands, then the table (rows gain "vs_ar")."""
    ar = {r["concurrency"]: r["output_tps"] for r in rows if r["row"] == "AR"}
    for r in rows:
        r["vs_ar"] = r["output_tps"] / ar[r["concurrency"]] if r["concurrency"] in ar else None
    models = [f"- teacher {describe_model(args.teacher)}"]
    if args.draft_model and "draft_model" in args.rows:
        models.append(f"- draft_model {describe_model(args.draft_model)}")
    if args.drafter and "kforcing" in args.rows:
        models.append(f"- kforcing drafter {describe_model(args.drafter)}")
    servers = {r["row"]: r["server_command"] for r in rows}
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    return "\n".join([
        f"vLLM {version} from `{args.vllm_env}`, env `{env}`; machine: {meta['device']}, "
        f"{os.cpu_count()} CPUs visible. Wall time of the whole run: {wall / 60:.1f} min.", "",
        f"Command: `{command_line(argv)}`", "",
        "Models:", *models, *([f"- {args.notes}"] if args.notes else []), "",
        f"Client: `vllm bench serve`, random dataset, {args.input_len} prompt + {args.output_len} output tokens "
        f"(--ignore-eos), temperature {args.temperature}, request rate {args.request_rate}, seed {args.seed}, "
        f"{args.num_warmups} warm-up requests; {args.num_speculative_tokens} drafts a step in every draft row. "
        "Acceptance length = 1 + accepted / drafts (the vllm:spec_decode_* counters of /metrics over the client "
        "run, warm-ups included). ITL is per streamed chunk; TPOT is per token.", "",
        "Server commands (vLLM's CLI run as `python -m kforcing.serving.vllm_serve`: vllm-cpu 0.32's own `vllm` "
        "script fails at start):",
        *[f"- {row}: `{command}`" for row, command in servers.items()], "",
        common.markdown_table(rows, COLUMNS), *[f"\nFAILED {failure}" for failure in failures]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--teacher", required=True, help="the teacher's Hugging Face folder (with tokenizer.json)")
    parser.add_argument("--drafter", default=None, help="the folder `kforcing export-vllm` wrote (row kforcing)")
    parser.add_argument("--draft-model", default=None, help="a small HF causal LM, same vocabulary (row draft_model)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="server configurations")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="requests in flight")
    parser.add_argument("--num-prompts", type=int, nargs="+", default=None,
                        help="requests per client run: one value, or one per concurrency (default max(8, 2C))")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="request arrivals per second")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--num-speculative-tokens", type=int, default=3, help="drafts a step (every draft row)")
    parser.add_argument("--num-warmups", type=int, default=2, help="warm-up requests before each client run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the server and the dataset")
    parser.add_argument("--max-model-len", type=int, default=512, help="the servers' --max-model-len")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="run the servers eagerly (no torch.compile: faster starts on a CPU)")
    parser.add_argument("--omp-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of vLLM's processes (default: torch's, one per core; on a small box, "
                        "fewer leave cores to the client and vLLM's front end)")
    parser.add_argument("--server-args", default=None, help="more `vllm serve` options, for every row (one string)")
    parser.add_argument("--port", type=int, default=8123, help="the servers' port")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for /health")
    parser.add_argument("--vllm-env", default=str(Path(__file__).resolve().parent.parent / "build" / "vllm-venv"),
                        help="vLLM's virtualenv, with kforcing installed (`make vllm-env`)")
    parser.add_argument("--log-dir", default="/tmp/bench_vllm_serving", help="server/client logs and raw results")
    parser.add_argument("--notes", default=None, help="text for the report (e.g. how the models were trained)")
    parser.add_argument("--no-save", action="store_true", help="print the table only; write nothing to bench/results")
    args = parser.parse_args(argv)
    check_inputs(args)
    if args.omp_threads:
        ENV["OMP_NUM_THREADS"] = str(args.omp_threads)
    vllm, version = vllm_cli(args)
    out_dir = Path(args.log_dir) / time.strftime("%Y%m%dT%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = common.metadata(torch.device("cpu"))
    start, rows, failures = time.time(), [], []
    for row in args.rows:
        try:
            bench_row(row, args, vllm, out_dir, rows)
        except (RuntimeError, subprocess.CalledProcessError) as error:  # the other rows still run
            failures.append(f"{row}: {error} (logs: {out_dir})")
            print(f"[{row}] FAILED: {failures[-1]}", flush=True)
    text = report_text(args, argv, rows, failures, meta, version, time.time() - start)
    print(f"\n{text}")
    if not args.no_save:
        settings = {**vars(args), "request_rate": str(args.request_rate)}  # JSON has no inf
        settings.update(command=command_line(argv), vllm=version, raw_results=str(out_dir), failures=failures)
        for path in common.save("vllm_serving", torch.device("cpu"), rows, text, extra={"settings": settings},
                                meta=meta):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
