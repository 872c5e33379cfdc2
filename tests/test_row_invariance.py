"""Row invariance of decoding: a row's logits are bitwise the same however many rows share its decode pass, so one
k-row verify pass equals k one-row AR steps and a sequence decodes alike alone or in a batch. What makes it hold:
decode_linear (per-row FMA chains) and window_attention_decode (key tiles at absolute positions)."""

import pytest
import torch
from conftest import expect_kernel
from tiny_models import DRAFT_CONFIG, draft_student, peaked_teacher
from tolerances import SAME_ROWS_FP32

import kforcing_ops as ko
from kforcing.decoding import steps as decode_steps
from kforcing.decoding.generate import generate_ar
from kforcing.models.transformer import ARModel, KVCache, ModelConfig, cast_linear_weights
from kforcing.students.draft.decode import generate_with_drafts
from kforcing.students.draft.student import HeadConfig
from kforcing.students.push_forward.model import PushForwardLM
from kforcing_ops import nn as kernel_nn
from kforcing_ops.nn import DECODE_LINEAR_MAX_ROWS, DecodeLinear, linear_mode, row_invariant_linears, torch_linears

PROMPTS = [7, 70, 33]  # ragged: one sequence's cache crosses a 64-key attention tile


def prefill(model, cache, seed=1):
    """Each sequence's prompt, one sequence at a time (different lengths: a ragged cache)."""
    gen = torch.Generator().manual_seed(seed)
    for b, length in enumerate(PROMPTS):
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen)
        single = KVCache.for_model(model, 1, cache.max_len, dtype=cache.k[0].dtype)
        model.decode(ids, single, logits=None)
        for layer in range(cache.num_layers):
            cache.k[layer][b, :length] = single.k[layer][0, :length]
            cache.v[layer][b, :length] = single.v[layer][0, :length]
        cache.seqlens[b] = length
    return cache


@pytest.fixture(scope="module", params=["tiny", "small"])
def teachers(request):
    torch.manual_seed(0)
    model = ARModel(ModelConfig.from_preset(request.param, max_seq_len=256)).eval()
    bf16 = cast_linear_weights(ARModel(model.config).eval(), torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) if v.dim() == 2 and "emb" not in k else v
                          for k, v in model.state_dict().items()})
    return {"float32": model, "bfloat16": bf16}


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_one_k_row_pass_equals_k_one_row_passes(teachers, weights):
    model = teachers[weights]
    for k in range(2, 17):
        new = torch.randint(0, model.config.vocab_size, (len(PROMPTS), k))
        together = model.decode(new, prefill(model, KVCache.for_model(model, 3, 128)), logits="all")
        cache = prefill(model, KVCache.for_model(model, 3, 128))
        one_by_one = torch.stack([model.decode(new[:, j:j + 1], cache, logits="last") for j in range(k)], dim=1)
        assert torch.equal(together, one_by_one), f"k = {k}"


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_a_sequence_decodes_alike_alone_and_in_a_batch(teachers, weights):
    model = teachers[weights]
    new = torch.randint(0, model.config.vocab_size, (3, 4))
    with expect_kernel("decode_linear", "window_attention_decode"):
        batch = model.decode(new, prefill(model, KVCache.for_model(model, 3, 128)), logits="all")
    for b, length in enumerate(PROMPTS):
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, model.config.vocab_size, (1, n), generator=gen) for n in PROMPTS]
        alone = KVCache.for_model(model, 1, 128)
        model.decode(prompts[b], alone, logits=None)
        assert torch.equal(model.decode(new[b:b + 1], alone, logits="all")[0], batch[b]), f"sequence {b}"


def test_push_forward_hints_are_row_invariant_too():
    torch.manual_seed(0)
    student = PushForwardLM(ModelConfig.from_preset("tiny"), max_k=8).eval()
    ids = torch.randint(0, 2048, (2, 9))
    u = torch.rand(2, 8)
    full = student.decode(ids, u, 0.7, KVCache.for_model(student, 2, 64))
    for k in (1, 3, 5):  # hint i only sees hints 0..i: fewer hints, the same logits
        assert torch.equal(student.decode(ids, u[:, :k], 0.7, KVCache.for_model(student, 2, 64)), full[:, :k])


def test_attention_rows_do_not_depend_on_which_keys_are_cached():
    """The same keys, appended over several calls or passed as new rows of one call: bitwise the same outputs."""
    torch.manual_seed(0)
    batch, length, heads, dim = 2, 150, 4, 32
    q = torch.randn(batch, length, heads, dim)
    k, v = torch.randn(batch, length, 2, dim), torch.randn(batch, length, 2, dim)
    cache = lambda: (torch.zeros(batch, 200, 2, dim), torch.zeros(batch, 200, 2, dim),  # noqa: E731
                     torch.zeros(batch, dtype=torch.int32))
    kc, vc, lens = cache()
    at_once = ko.window_attention_decode(q, k, v, kc, vc, lens, length)
    for split in (1, 63, 64, 65, 100):
        kc, vc, lens = cache()
        ko.window_attention_decode(q[:, :split], k[:, :split], v[:, :split], kc, vc, lens, split)
        lens += split
        rest = ko.window_attention_decode(q[:, split:], k[:, split:], v[:, split:], kc, vc, lens, length - split)
        assert torch.equal(rest, at_once[:, split:]), f"first {split} keys cached"


def test_linear_layers_use_the_kernel_only_in_decode_passes():
    layer = DecodeLinear(32, 16)
    x = torch.randn(DECODE_LINEAR_MAX_ROWS + 1, 32)
    with torch.no_grad():
        with expect_kernel("decode_linear"):
            small = layer(x[:DECODE_LINEAR_MAX_ROWS])
        torch.testing.assert_close(small, torch.nn.functional.linear(x[:DECODE_LINEAR_MAX_ROWS], layer.weight,
                                                                     layer.bias))
        with torch_linears():  # the switch benchmarks use for "before"
            assert torch.equal(layer(x[:4]), torch.nn.functional.linear(x[:4], layer.weight, layer.bias))
        # past the row limit: torch's GEMM, which is faster there
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    out = layer(x[:4])  # grad mode: torch's GEMM, differentiable
    out.sum().backward()
    assert layer.weight.grad is not None


def test_row_invariant_linears_run_the_kernel_past_the_row_limit():
    layer = DecodeLinear(48, 24)
    x = torch.randn(3 * DECODE_LINEAR_MAX_ROWS + 5, 48)
    assert linear_mode() == "kernel"
    with torch.no_grad(), row_invariant_linears():
        assert linear_mode() == "row-invariant"
        with expect_kernel("decode_linear"):
            together = layer(x)
        one_by_one = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])
        with torch_linears():  # the benchmarks' "before" still wins
            assert linear_mode() == "torch"
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert linear_mode() == "kernel"
    assert torch.equal(together, one_by_one)
    out = layer(x)  # grad mode: torch's GEMM, differentiable, whatever the mode
    out.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_a_verify_pass_past_the_row_limit_equals_the_ar_steps_it_stands_for(teachers, weights):
    """17 sequences x 4 rows (68 rows, past DECODE_LINEAR_MAX_ROWS): inside row_invariant_linears, as decoders run
    it, every row's logits have the bits of the 17-row AR steps over the same tokens."""
    model, batch, k = teachers[weights], 17, 4
    prompt = torch.randint(0, model.config.vocab_size, (batch, 3))
    new = torch.randint(0, model.config.vocab_size, (batch, k))

    def prefilled():
        cache = KVCache.for_model(model, batch, 16)
        model.decode(prompt, cache, logits=None)
        return cache

    with row_invariant_linears():
        together = model.decode(new, prefilled(), logits="all")
        cache = prefilled()
        steps = torch.stack([model.decode(new[:, j:j + 1], cache, logits="last") for j in range(k)], dim=1)
    assert torch.equal(together, steps)


def test_draft_decoding_runs_no_gemm_after_the_prefill(monkeypatch):
    """At batch 17 with k = 4 a verify pass has 68 rows; it must run the kernel as AR's 17-row steps do (torch's
    GEMM would give its rows other bits). Every prompt here is short, so no pass may reach torch's GEMM."""
    student = draft_student(peaked_teacher(), HeadConfig(max_k=4, pathway="chain", num_layers=1))
    prompts = [[1 + b % 7, 2 + b % 5] for b in range(17)]
    want = generate_ar(student.teacher, prompts, 12, seed=3, temperature=0.8)

    def no_gemm(*args):
        raise AssertionError("a decode pass ran torch's GEMM")

    monkeypatch.setattr(kernel_nn.F, "linear", no_gemm)
    assert torch.equal(generate_ar(student.teacher, prompts, 12, seed=3, temperature=0.8).tokens, want.tokens)
    for k in (4, None):
        got = generate_with_drafts(student, prompts, 12, k=k, seed=3, temperature=0.8)
        assert torch.equal(got.tokens, want.tokens)


def test_draft_decoding_prefills_as_ar_does(monkeypatch):
    """Long ragged prompts (prefill passes past the row limit run torch's GEMM): the teacher's cache after a draft
    decoder's prefill holds the bits of AR's, row for row."""
    caches = []
    make = decode_steps.KVCache.for_model
    monkeypatch.setattr(decode_steps.KVCache, "for_model", lambda *a, **kw: caches.append(make(*a, **kw)) or caches[-1])
    student = draft_student(peaked_teacher(), HeadConfig(max_k=4, pathway="chain", num_layers=1))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, DRAFT_CONFIG.vocab_size, (n,), generator=gen).tolist() for n in (30, 61, 45, 70)]
    generate_ar(student.teacher, prompts, 1, seed=0)
    generate_with_drafts(student, prompts, 1, k=4, seed=0)
    ar, draft = caches
    for b, prompt in enumerate(prompts):
        for layer in range(ar.num_layers):
            assert torch.equal(ar.k[layer][b, :len(prompt)], draft.k[layer][b, :len(prompt)]), (b, layer)
            assert torch.equal(ar.v[layer][b, :len(prompt)], draft.v[layer][b, :len(prompt)]), (b, layer)


def test_bf16_weights_decode_with_fp32_activations():
    torch.manual_seed(0)
    model = cast_linear_weights(ARModel(ModelConfig.from_preset("tiny")).eval(), torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.tok_emb.weight.dtype == torch.float32
    ids = torch.randint(0, 2048, (2, 5))
    logits = model.decode(ids, KVCache.for_model(model, 2, 16, dtype=torch.float32), logits="all")
    assert logits.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids), atol=1e-4, rtol=1e-4)  # the forward casts the weights
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cast_linear_weights(model, torch.float16)


def test_decoding_on_the_kernel_matches_torch_gemm():
    torch.manual_seed(0)
    model = ARModel(ModelConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 2048, (3, 12))
    kernel = model.decode(ids, KVCache.for_model(model, 3, 32), logits="all")
    with torch_linears():
        gemm = model.decode(ids, KVCache.for_model(model, 3, 32), logits="all")
    torch.testing.assert_close(kernel, gemm, **SAME_ROWS_FP32)
