"""Decoding with vLLM, the kforcing drafter proposing: run in vLLM's environment by tests/test_vllm_serving.py (not a
test module itself: vLLM and kforcing's test environment have different torch builds).

    python tests/vllm_decode.py OUT.json '{"teacher": DIR, "drafter": DIR, "prompts": [[...]], "max_tokens": N,
                                           "sample_prompt": [...], "samples": M, "sample_tokens": T, "temperature": t}'

writes OUT.json (vLLM logs to stdout): the greedy tokens of every prompt, vLLM's speculative-decoding counters
(drafts, draft tokens, accepted tokens, accepted per draft position), and the first T tokens of M samples of
sample_prompt at temperature t (seeds 0..M-1).
"""

import json
import sys
from pathlib import Path


def _spec_metrics(llm):
    """vLLM's vllm:spec_decode_* counters: {name: value, or values per position}."""
    found = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            found[metric.name] = list(metric.values) if hasattr(metric, "values") else metric.value
    return found


def main():
    out_path, request = Path(sys.argv[1]), json.loads(sys.argv[2])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=request["teacher"], dtype="float32", enforce_eager=True, skip_tokenizer_init=True, seed=0,
              max_model_len=256, max_num_seqs=64, disable_log_stats=False,
              speculative_config={"method": "eagle", "model": request["drafter"],
                                  "num_speculative_tokens": request.get("num_speculative_tokens", 3)})
    greedy = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]],
                          SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True,
                                         detokenize=False), use_tqdm=False)
    metrics = _spec_metrics(llm)
    sampled = []
    if request.get("samples"):
        outputs = llm.generate([TokensPrompt(prompt_token_ids=request["sample_prompt"])] * request["samples"],
                               [SamplingParams(temperature=request["temperature"], max_tokens=request["sample_tokens"],
                                               seed=seed, ignore_eos=True, detokenize=False)
                                for seed in range(request["samples"])], use_tqdm=False)
        sampled = [list(out.outputs[0].token_ids) for out in outputs]
    out_path.write_text(json.dumps({"greedy": [list(out.outputs[0].token_ids) for out in greedy], "spec": metrics,
                                    "sampled": sampled}))


if __name__ == "__main__":  # vLLM's engine starts worker processes: the script must not run again in them
    main()
