"""Decoding on a GPU (scripts/gpu_check.sh runs these; elsewhere they are skipped): every draft design's verified
decoding equals AR sampling token for token on the card, in float32 and bfloat16, on the CUDA kernels; a Hugging
Face teacher in bfloat16 matches transformers' own SDPA attention and decodes losslessly."""

import pytest
import torch
from conftest import expect_kernel
from tiny_models import draft_student, peaked_teacher

from kforcing.decoding.generate import generate_ar
from kforcing.students.draft.decode import generate_with_drafts
from kforcing.students.draft.student import DraftStudent, HeadConfig

pytestmark = pytest.mark.cuda

RAGGED = [[1, 5, 9, 2, 7], [3], [4, 4, 8, 11, 20, 31, 2, 6, 9], [12, 13], [7, 7], [40, 41, 42], [9], [60, 2, 2, 2]]
SAMPLINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9), dict(top_k=1)]
PATHWAYS = {"chain": dict(num_layers=1), "head": dict(num_layers=1), "trunk": {}}
DECODE_KERNELS = ("window_attention_decode", "decode_linear", "inverse_cdf_sample")


def _assert_equal_to_ar(student, prompts, new_tokens, **sampling):
    want = generate_ar(student.teacher, prompts, new_tokens, seed=3, eos_id=3, **sampling)
    for k in (2, 4, None):  # k pinned, then adaptive drafting
        got = generate_with_drafts(student, prompts, new_tokens, k=k, seed=3, eos_id=3, **sampling)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths), (k, sampling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pathway", list(PATHWAYS))
def test_verified_decoding_equals_ar_on_the_gpu(pathway, dtype):
    student = draft_student(peaked_teacher(), HeadConfig(max_k=4, pathway=pathway, **PATHWAYS[pathway]))
    student = student.to("cuda", dtype)
    with expect_kernel(*DECODE_KERNELS):
        generate_with_drafts(student, RAGGED[:2], 6, k=4, seed=0)
    for sampling in SAMPLINGS:
        _assert_equal_to_ar(student, RAGGED, 40, **sampling)
    unverified = generate_with_drafts(student, RAGGED, 16, k=4, seed=3, verify=False)
    speculative = generate_with_drafts(student, RAGGED, 16, k=4, seed=3, acceptance="speculative")
    for out in (unverified, speculative):
        assert out.tokens.shape == (len(RAGGED), 16) and 0 <= int(out.tokens.min()) <= int(out.tokens.max()) < 97
    assert unverified.num_passes == 2 + 16 // 4  # the ragged prefill (two passes), then 4 tokens a pass


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_an_hf_teacher_in_bf16_matches_transformers_sdpa_and_decodes_losslessly(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_models import VOCAB, save_tiny

    from kforcing.teachers.hf_teacher import load_hf_teacher

    exact = save_tiny(family, tmp_path, dtype=torch.float64).to("cuda")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa",
                                                               dtype=torch.bfloat16).to("cuda").eval()
    teacher, _ = load_hf_teacher(f"hf:{tmp_path}", device="cuda", dtype=torch.bfloat16, with_tokenizer=False)
    ids = torch.randint(0, VOCAB, (3, 48), device="cuda")
    with torch.no_grad():
        reference = exact(ids).logits
        their_error = (theirs(ids).logits.double() - reference).abs().max().item()
        our_error = (teacher(ids).double() - reference).abs().max().item()
    print(f"{family} bf16 logits, max |error| vs float64: kforcing {our_error:.4f}, transformers sdpa "
          f"{their_error:.4f}")
    # flash-attention's criterion: at most twice the error of transformers' own bf16 path, plus a bf16 floor
    assert our_error <= 2 * their_error + 2e-2

    for pathway, layers in (("trunk", {}), ("chain", dict(num_layers=1))):
        torch.manual_seed(1)
        student = DraftStudent.from_teacher(teacher, HeadConfig(pathway=pathway, max_k=4, **layers))
        with torch.no_grad():
            for param in student.head.parameters():
                param.add_(0.05 * torch.randn_like(param))
        student = student.to("cuda", torch.bfloat16).eval()
        _assert_equal_to_ar(student, [[p % VOCAB for p in prompt] for prompt in RAGGED], 24,
                            temperature=0.8, top_k=40, top_p=0.95)
