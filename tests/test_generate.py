"""kforcing.decoding.generate and kforcing.noise: cached decoding equals the full forward, coupling, determinism,
plumbing."""

import pytest
import torch
from conftest import DEVICES, HAS_GPU
from tolerances import CACHED_VS_FULL

import kforcing_ops
from kforcing.decoding.compiled import COMPILE_OPTIONS
from kforcing.decoding.generate import generate_ar, generate_kforcing
from kforcing.models.transformer import ARModel, KVCache, ModelConfig
from kforcing.noise import counter_uniform, hash3, hash3_python, splitmix64, splitmix64_python
from kforcing.students.push_forward.model import PushForwardLM
from kforcing_ops import _ext

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

TINY = ModelConfig.from_preset("tiny", vocab_size=97, max_seq_len=96)


def make_models(device="cpu", max_k=4, seed=0):
    torch.manual_seed(seed)
    teacher = ARModel(TINY).to(device).eval()
    # Sharper distributions than at initialisation, so sampling is not uniform noise.
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)
    student = PushForwardLM.from_teacher(teacher, max_k).eval()
    with torch.no_grad():  # a noise encoder that matters, so argmax tokens depend on u as a trained one's do
        student.noise.weight.normal_(std=1.0)
        for p in student.noise.mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------------------
# Noise


def test_hash_matches_the_python_specification():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**32, 2**62 + 17, 2**63 - 1]
    got = splitmix64(torch.tensor(values, dtype=torch.int64))
    for value, bits in zip(values, got.tolist()):
        assert bits % 2**64 == splitmix64_python(value)
    seeds, seqs, positions = [0, 7, 2**40], [0, 3, 1000], [0, 1, 4095]
    for seed in seeds:
        for seq in seqs:
            for pos in positions:
                assert int(hash3(seed, torch.tensor(seq), pos)) % 2**64 == hash3_python(seed, seq, pos)


def test_counter_uniform_is_a_pure_uniform_function():
    positions = torch.arange(200000)
    u = counter_uniform(3, 0, positions)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / len(u)
    assert bool(((hist - 0.1).abs() < 0.005).all())
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01  # neighbours are independent
    torch.testing.assert_close(counter_uniform(3, 0, positions[1000:1010]), u[1000:1010], atol=0, rtol=0)
    assert not torch.equal(counter_uniform(4, 0, positions[:10]), u[:10])
    assert not torch.equal(counter_uniform(3, 1, positions[:10]), u[:10])
    # broadcasting: (B, 1) sequences x (1, T) positions
    grid = counter_uniform(3, torch.arange(2)[:, None], positions[None, :5])
    torch.testing.assert_close(grid[0], u[:5], atol=0, rtol=0)


@pytest.mark.cuda
def test_counter_uniform_is_identical_on_cuda():
    positions = torch.arange(100000)
    torch.testing.assert_close(counter_uniform(11, 5, positions.cuda()).cpu(), counter_uniform(11, 5, positions),
                               atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Cached decoding equals the full forward


@pytest.mark.parametrize("device", DEVICES)
def test_ar_cached_steps_equal_full_forward(device):
    teacher, _ = make_models(device)
    ids = torch.randint(0, TINY.vocab_size, (3, 40), device=device)
    full = teacher(ids)
    cache = KVCache.for_model(teacher, 3, 48)
    steps = [teacher.decode(ids[:, :7], cache, logits="all")]
    for t in range(7, 40, 3):
        steps.append(teacher.decode(ids[:, t:t + 3], cache, logits="all"))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **CACHED_VS_FULL)
    assert cache.seqlens.tolist() == [40, 40, 40]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3, 4])
def test_kforcing_steps_equal_forward_train(device, k):
    """Step 1 = [prompt | k hints], later steps = [k committed | k hints]: the hint logits of each step equal
    forward_train's logits for the window anchored at the last committed token, with the same u."""
    _, student = make_models(device)
    ids = torch.randint(0, TINY.vocab_size, (2, 30), device=device)
    u = counter_uniform(5, torch.arange(2, device=device)[:, None, None],
                        torch.arange(30, device=device)[None, :, None] + 1 + torch.arange(k, device=device))
    tau = torch.tensor([0.8, 1.2], device=device)
    full = student.forward_train(ids, u, tau)
    cache = KVCache.for_model(student, 2, 40)
    prompt = 6
    logits = student.decode(ids[:, :prompt], u[:, prompt - 1], tau, cache)
    torch.testing.assert_close(logits, full[:, prompt - 1], **CACHED_VS_FULL)
    t = prompt - 1
    while t + k < 30:
        logits = student.decode(ids[:, t + 1:t + 1 + k], u[:, t + k], tau, cache)
        t += k
        torch.testing.assert_close(logits, full[:, t], **CACHED_VS_FULL)
        assert cache.seqlens.tolist() == [t + 1, t + 1]


def test_self_forcing_layout_equals_two_decode_steps():
    """forward_train with window_tokens (docs/method.md §5) = step 1 [context | k hints], then step 2
    [the k tokens | k hints]: the second pass of the self-forcing teacher."""
    _, student = make_models(max_k=2)
    k = 2
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    first = counter_uniform(1, torch.arange(2)[:, None, None], torch.arange(12)[None, :, None] + torch.arange(k))
    second = 1 - first
    window_tokens = student.forward_train(ids, first, 1.0).argmax(-1)  # the teacher's own first k tokens
    sf = student.forward_train(ids, second, 1.0, window_size=2 * k, window_tokens=window_tokens)
    t = 7
    cache = KVCache.for_model(student, 2, 32)
    step1 = student.decode(ids[:, :t + 1], first[:, t], 1.0, cache)
    torch.testing.assert_close(step1.argmax(-1), window_tokens[:, t])
    step2 = student.decode(window_tokens[:, t], second[:, t], 1.0, cache)
    torch.testing.assert_close(step2, sf[:, t], **CACHED_VS_FULL)


# ---------------------------------------------------------------------------------------------------------
# Coupling and determinism


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_generate_ar_is_inverse_cdf_of_the_full_forward(sampling):
    teacher, _ = make_models()
    prompts = prompts_of([5, 9, 2])
    out = generate_ar(teacher, prompts, 20, seed=42, **sampling)
    for b, prompt in enumerate(prompts):
        sequence = torch.tensor(prompt + out.tokens[b].tolist())
        logits = teacher(sequence[None])[0]
        p = len(prompt)
        positions = torch.arange(p, p + 20)
        u = counter_uniform(42, b, positions)
        expected = kforcing_ops.reference.inverse_cdf_sample(logits[p - 1:p + 19].double(), u, **sampling)
        assert out.tokens[b].tolist() == expected.tolist()
    assert out.num_passes == 1 + 1 + 19  # ragged prefill + [tail] + one pass per further token
    assert len(set(out.tokens.flatten().tolist())) > 5  # it samples, it does not repeat one token


@pytest.mark.parametrize("k", [1, 3, 4])
def test_generate_kforcing_is_argmax_of_forward_train(k):
    """Each window of generated tokens = argmax of forward_train's hint logits on the generated sequence, with
    the window anchored at the last token before it and the uniforms of its positions."""
    _, student = make_models()
    prompts = prompts_of([5, 9])
    n = 10
    out = generate_kforcing(student, prompts, n, k=k, seed=8, temperature=0.9)
    for b, prompt in enumerate(prompts):
        p = len(prompt)
        sequence = torch.tensor(prompt + out.tokens[b].tolist())[None]
        anchors = torch.arange(p - 1, p - 1 + n, k)
        u = counter_uniform(8, b, anchors[:, None] + 1 + torch.arange(k))
        full = torch.zeros(1, len(sequence[0]), k, dtype=torch.float64)
        full[0, anchors] = u
        logits = student.forward_train(sequence, full, 0.9)[0, anchors]
        assert logits.argmax(-1).flatten()[:n].tolist() == out.tokens[b].tolist()


@pytest.mark.parametrize("kind", ["ar", "kforcing"])
def test_same_seed_same_samples_whatever_the_batch(kind):
    teacher, student = make_models()
    prompts = prompts_of([4, 7, 3, 9, 5, 6, 4], seed=1)

    def run(batch, ids=None):
        if kind == "ar":
            return generate_ar(teacher, batch, 12, seed=7, sequence_ids=ids).tokens
        return generate_kforcing(student, batch, 12, k=3, seed=7, sequence_ids=ids).tokens

    full = run(prompts)
    assert full.shape == (7, 12)
    for i in (0, 3, 6):  # batch size 1, with the sequence's id in the request
        assert torch.equal(run([prompts[i]], [i])[0], full[i])
    order = [6, 2, 0, 5, 1, 4, 3]
    reordered = run([prompts[i] for i in order], order)
    assert torch.equal(reordered, full[order])
    assert not torch.equal(run(prompts, list(range(10, 17))), full)  # other ids, other noise
    assert torch.equal(run(prompts), full)  # and it is repeatable


def test_ar_and_kforcing_draw_the_same_noise(monkeypatch):
    """Coupling: both loops use exactly the uniforms u(seed, sequence, position) of the generated positions (AR's
    sampler calls, the push-forward student's hint rows)."""
    teacher, student = make_models()
    prompts = prompts_of([3, 5])
    expected = torch.stack([counter_uniform(9, b, len(p) + torch.arange(8)) for b, p in enumerate(prompts)])
    sampled = []
    sample = kforcing_ops.inverse_cdf_sample
    monkeypatch.setattr(kforcing_ops, "inverse_cdf_sample",
                        lambda logits, u, *args: sampled.append(u.clone()) or sample(logits, u, *args))
    generate_ar(teacher, prompts, 8, seed=9)
    assert torch.equal(torch.stack(sampled, dim=1), expected)
    hinted = []
    embed = student.embed_noise
    monkeypatch.setattr(student, "embed_noise", lambda u, tau: hinted.append(u.clone()) or embed(u, tau))
    generate_kforcing(student, prompts, 8, k=4, seed=9)
    assert torch.equal(torch.cat(hinted, dim=1).flatten(1), expected)


# ---------------------------------------------------------------------------------------------------------
# Plumbing: ragged prompts, EOS, max_new_tokens, k


@pytest.mark.parametrize("kind", ["ar", "kforcing"])
def test_ragged_prompts_equal_each_prompt_alone(kind):
    teacher, student = make_models()
    prompts = prompts_of([1, 8, 3, 13])
    gen = (lambda p, ids: generate_ar(teacher, p, 9, seed=2, sequence_ids=ids)) if kind == "ar" else (
        lambda p, ids: generate_kforcing(student, p, 9, k=2, seed=2, sequence_ids=ids))
    batch = gen(prompts, None)
    for i, prompt in enumerate(prompts):
        assert torch.equal(gen([prompt], [i]).tokens[0], batch.tokens[i])
    equal = gen([prompts[1], prompts[1]], [1, 1])  # equal lengths: no prefill pass
    assert torch.equal(equal.tokens[0], batch.tokens[1])
    assert equal.num_passes == batch.num_passes - 1


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_max_new_tokens_is_exact_and_passes_drop_by_k(k):
    _, student = make_models()
    for n in (1, 5, 8, 13):
        out = generate_kforcing(student, prompts_of([4, 4]), n, k=k, seed=1)
        assert out.tokens.shape == (2, n) and out.lengths.tolist() == [n, n]
        assert out.num_passes == -(-n // k)
        assert [len(t) for t in out.tolist()] == [n, n]
    # k' < k tokens per pass give a prefix-consistent first window (hint i sees hints 0..i only).
    four = generate_kforcing(student, prompts_of([4]), 4, k=4, seed=1).tokens
    assert torch.equal(generate_kforcing(student, prompts_of([4]), 1, k=4, seed=1).tokens, four[:, :1])


@pytest.mark.parametrize("kind", ["ar", "kforcing"])
def test_eos_stops_and_masks(kind):
    teacher, student = make_models()
    prompts = prompts_of([3, 6, 4])
    run = (lambda **kw: generate_ar(teacher, prompts, 16, seed=3, **kw)) if kind == "ar" else (
        lambda **kw: generate_kforcing(student, prompts, 16, k=4, seed=3, **kw))
    free = run()
    eos = free.tokens[1, 5].item()  # a token sequence 1 emits at its 6th step
    out = run(eos_id=eos, pad_id=96 if eos != 96 else 95)
    pad = 96 if eos != 96 else 95
    for b in range(3):
        row = free.tokens[b].tolist()
        n = row.index(eos) + 1 if eos in row else 16
        assert out.lengths[b].item() == n
        assert out.tokens[b, :n].tolist() == row[:n]
        assert set(out.tokens[b, n:].tolist()) <= {pad}
    assert out.tolist()[1][-1] == eos


def test_generation_stops_early_when_all_sequences_finished():
    teacher, student = make_models()
    prompts = prompts_of([3, 3])
    free = generate_ar(teacher, prompts, 30, seed=4)
    rows = [free.tokens[b].tolist() for b in range(2)]
    eos = next(t for t in rows[0] if t in rows[1])  # a token both sequences emit
    out = generate_ar(teacher, prompts, 30, seed=4, eos_id=eos)
    last = max(row.index(eos) for row in rows)
    assert out.num_passes == last + 1 < 30  # equal prompt lengths: one pass per token, none after the last EOS
    assert out.lengths.tolist() == [row.index(eos) + 1 for row in rows]
    first = generate_kforcing(student, [prompts[0]], 4, k=4, seed=4).tokens[0, 0].item()
    out_kf = generate_kforcing(student, [prompts[0]], 32, k=4, seed=4, eos_id=first)
    assert out_kf.num_passes == 1 and out_kf.lengths.item() == 1


def test_frequency_penalty():
    _, student = make_models()
    prompts = prompts_of([5])
    plain = generate_kforcing(student, prompts, 24, k=1, seed=0)
    penalised = generate_kforcing(student, prompts, 24, k=1, seed=0, freq_penalty=1e4)
    assert len(set(penalised.tokens[0].tolist())) == 24  # a huge penalty forbids every repeat
    assert len(set(plain.tokens[0].tolist())) < 24
    # Within one pass the k tokens share the counts of the earlier steps.
    first = generate_kforcing(student, prompts, 4, k=4, seed=0, freq_penalty=1e4).tokens
    assert torch.equal(first, generate_kforcing(student, prompts, 4, k=4, seed=0).tokens)


# ---------------------------------------------------------------------------------------------------------
# Static shapes


def test_compiled_step_matches_eager(monkeypatch):
    torch._dynamo.reset()
    teacher, student = make_models()
    prompts = prompts_of([4, 6])
    ar = generate_ar(teacher, prompts, 6, seed=5)
    kf = generate_kforcing(student, prompts, 8, k=2, seed=5)
    # The default inductor backend needs minutes of C++ compilation on 2 cores: trace with aot_eager.
    monkeypatch.setitem(COMPILE_OPTIONS, "backend", "aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(2):  # the second call reuses the compiled steps (same shapes): no recompilation
        assert torch.equal(generate_ar(teacher, prompts, 6, seed=5, compile=True).tokens, ar.tokens)
        assert torch.equal(generate_kforcing(student, prompts, 8, k=2, seed=5, compile=True).tokens, kf.tokens)
    # One graph per step function: no graph break (the ops are custom ops, no host sync) and no recompile.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_cuda_graph_flag_needs_cuda():
    teacher, _ = make_models()
    with pytest.raises(ValueError, match="CUDA"):
        generate_ar(teacher, prompts_of([3]), 4, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.skipif(HAS_GPU and not _ext.has_kernel("window_attention_decode", torch.device("cuda")),
                    reason="CUDA graphs need the CUDA window_attention_decode kernel (the reference syncs)")
def test_cuda_graph_matches_eager_on_gpu():
    teacher, student = make_models("cuda")
    for seed in (1, 2):  # the second call reuses the pooled cache and its graphs, with other prompts and noise
        prompts = prompts_of([4, 9, 6], seed=seed)
        assert torch.equal(generate_ar(teacher, prompts, 10, seed=seed, cuda_graph=True).tokens,
                           generate_ar(teacher, prompts, 10, seed=seed).tokens)
        for k in (4, 2):
            assert torch.equal(generate_kforcing(student, prompts, 12, k=k, seed=seed, cuda_graph=True).tokens,
                               generate_kforcing(student, prompts, 12, k=k, seed=seed).tokens)


@pytest.mark.cuda
def test_gpu_generation_matches_cpu():
    teacher, student = make_models("cpu")
    prompts = prompts_of([4, 9, 6])
    ar_cpu = generate_ar(teacher, prompts, 10, seed=1).tokens
    kf_cpu = generate_kforcing(student, prompts, 12, k=4, seed=1).tokens
    teacher.cuda(), student.cuda()
    # Same u; logits differ in the last bits, so a token may flip only at a CDF boundary / argmax tie.
    agree_ar = (generate_ar(teacher, prompts, 10, seed=1).tokens.cpu() == ar_cpu).float().mean()
    agree_kf = (generate_kforcing(student, prompts, 12, k=4, seed=1).tokens.cpu() == kf_cpu).float().mean()
    assert agree_ar > 0.9 and agree_kf > 0.9


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors():
    teacher, student = make_models(max_k=2)
    with pytest.raises(ValueError, match="k=3 is not allowed.*max_k=2"):
        generate_kforcing(student, prompts_of([3]), 4, k=3)
    with pytest.raises(ValueError, match="longer than the model's max_seq_len=96"):
        generate_ar(teacher, prompts_of([97]), 1)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        generate_kforcing(student, prompts_of([90]), 10, k=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_ar(teacher, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="outside"):
        generate_ar(teacher, [[1, 200]], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ar(teacher, [[1]], 0)
    with pytest.raises(ValueError, match="list of prompts"):
        generate_ar(teacher, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="sequence_ids"):
        generate_ar(teacher, [[1], [2]], 2, sequence_ids=[0])
    with pytest.raises(TypeError, match=r"needs a push-forward student \(PushForwardLM\), got ARModel"):
        generate_kforcing(teacher, [[1]], 2)
    with pytest.raises(TypeError, match="generate_ar needs a teacher"):
        generate_ar(student, [[1]], 2)
    with pytest.raises(ValueError, match="temperature"):
        generate_kforcing(student, [[1]], 2, temperature=0.0)
    with pytest.raises(ValueError, match="KV cache holds 1 sequences"):
        teacher.decode(torch.zeros(2, 1, dtype=torch.long), KVCache.for_model(teacher, 1, 8))
