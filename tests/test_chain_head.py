"""The chain pathway: a one-block head drafting one token per call, verified equal to AR sampling token for token."""

import copy

import pytest
import torch
from tiny_models import DRAFT_CONFIG as CONFIG
from tiny_models import draft_student, peaked_teacher

from kforcing.decoding.generate import generate_ar
from kforcing.models.transformer import KVCache
from kforcing.students.draft.chain_head import ChainHead
from kforcing.students.draft.decode import generate_with_drafts
from kforcing.students.draft.student import DraftStudent, HeadConfig, Sampling
from kforcing.students.draft.targets import chain_rollout, chain_step

PROMPTS = [[1, 5, 9, 2, 7], [3], [4, 4, 8, 11, 20, 31, 2, 6, 9], [12, 13]]
SAMPLINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9), dict(top_k=1)]


def _student(num_layers=1, max_k=4, scale=0.05):
    return draft_student(peaked_teacher(), HeadConfig(num_layers=num_layers, max_k=max_k, pathway="chain"),
                         scale=scale)


def _trained(student, steps=60):
    """`student` after a few chain steps on the teacher's own samples: its drafts are often right, so decoding
    accepts some drafts and rejects others."""
    texts = generate_ar(student.teacher, [[i % CONFIG.vocab_size] for i in range(16)], 31, seed=9).tokens
    sampling = Sampling(0.7, 20, 0.9)
    optimizer = torch.optim.AdamW(student.head.parameters(), lr=1e-2)
    student.head.train()
    for step in range(steps):
        loss, _ = chain_step(student, texts, torch.rand(16, 31, 4, generator=torch.Generator().manual_seed(step)),
                             sampling)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


@pytest.fixture(scope="module")
def trained():
    return _trained(_student())


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("k", [2, 3, 4, None])
def test_verified_decoding_equals_ar_sampling(trained, sampling, k):
    student = trained
    want = generate_ar(student.teacher, PROMPTS, 40, seed=2, **sampling)
    got = generate_with_drafts(student, PROMPTS, 40, k=k, seed=2, round_costs=(1.0, 1.2) if k is None else None,
                               **sampling)
    assert torch.equal(got.tokens, want.tokens)
    if k is not None:  # drafts are accepted and rejected: both paths are exercised
        assert 0.0 < got.accepted[0] < 1.0


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_verified_decoding_equals_ar_with_ragged_prompts_and_eos(batch, sampling):
    student = _student(num_layers=2)
    prompts = [PROMPTS[i % len(PROMPTS)][: 1 + (3 * i) % 7] for i in range(batch)]
    want = generate_ar(student.teacher, prompts, 30, seed=7, eos_id=3, **sampling)
    for k, costs in ((4, None), (3, None), (None, (1.0, 1.2)), (None, (1.0, 100.0)), (None, None)):
        got = generate_with_drafts(student, prompts, 30, k=k, seed=7, eos_id=3, round_costs=costs, **sampling)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths), (k, costs)


def test_unverified_decoding_makes_k_tokens_per_pass_and_speculative_runs(trained):
    student = trained
    out = generate_with_drafts(student, PROMPTS, 33, k=4, seed=0, verify=False)
    ar = generate_ar(student.teacher, PROMPTS, 33, seed=0)
    assert out.num_passes == 2 + -(-(33 - 1) // 4)  # the ragged prefill is two passes, as AR's
    assert torch.equal(out.tokens[:, 0], ar.tokens[:, 0])
    spec = generate_with_drafts(student, PROMPTS, 33, k=4, seed=0, acceptance="speculative")
    assert spec.lengths.tolist() == [33] * len(PROMPTS) and spec.accepted[0] > 0.0


def test_decoding_rows_match_the_training_layout():
    """The head's features in decoding (its cache filled with teacher-feature rows, then one-row chain calls) equal
    the training rollout's, window by window: training learns the computation decoding runs."""
    student = _student(num_layers=2)
    teacher, head = student.teacher, student.head
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 12))
    continued = torch.randint(0, CONFIG.vocab_size, (1, 11, 3))
    with torch.no_grad():
        stream, _ = student.trunk(ids)
        hidden, tokens = chain_rollout(student, stream.features, ids, 2, lambda step, _: continued[:, :, step])
        assert torch.equal(tokens, continued)
        for p in (0, 4, 10):
            cache = KVCache(2, 1, 32, CONFIG.n_kv_head, CONFIG.head_dim)
            feature = head.decode(teacher, stream.features[:, :p + 1], ids[:, 1:p + 2], cache, p + 1)[:, -1]
            torch.testing.assert_close(feature, hidden[:, p, 0], rtol=1e-5, atol=1e-5)
            for step in range(2):
                feature = head.decode(teacher, feature[:, None], continued[:, p, step:step + 1], cache, 1)[:, 0]
                torch.testing.assert_close(feature, hidden[:, p, step + 1], rtol=1e-5, atol=1e-5)


def test_chain_step_trains_only_the_head_and_learns():
    student = _student(scale=0.0)
    student.head.train()
    sampling = Sampling(0.7, 20, 0.9)
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (4, 24))
    u = torch.rand(4, 24, 4)
    optimizer = torch.optim.AdamW(student.head.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, metrics = chain_step(student, ids, u, sampling)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(metrics["acceptance"]) == 1 and "tokens_per_pass" not in metrics
    assert all(p.grad is None for p in student.teacher.parameters())
    assert losses[-1] < 0.5 * losses[0]
    _, measured = chain_step(student.eval(), ids, u, sampling, rollout=True)
    assert measured["tokens_per_pass"] == pytest.approx(1 + sum(measured["acceptance"]))
    assert 1.0 >= measured["acceptance"][0] >= measured["acceptance"][1] >= measured["acceptance"][2] >= 0.0


def test_the_head_starts_from_the_teachers_last_block():
    teacher = peaked_teacher()
    student = DraftStudent.from_teacher(teacher, HeadConfig(num_layers=1, pathway="chain"))
    for name, value in student.head.blocks[0].state_dict().items():
        assert torch.equal(value, teacher.blocks[-1].state_dict()[name])
    assert isinstance(student.head, ChainHead) and not any(p.requires_grad for p in teacher.parameters())


def test_bad_chain_configs_are_refused():
    with pytest.raises(ValueError, match="readout 'categorical'"):
        HeadConfig(pathway="chain", readout="onehot")
    with pytest.raises(ValueError, match="cannot be copied"):
        DraftStudent.from_teacher(peaked_teacher(), HeadConfig(num_layers=4, pathway="chain"))
    with pytest.raises(ValueError, match="no hint rows"):
        generate_with_drafts(_student(), PROMPTS, 4, hint_seed=3)


def test_a_draft_vocabulary_drafts_only_its_tokens_and_stays_exact(trained, monkeypatch):
    """With a draft vocabulary of the 40 most frequent tokens, every draft is one of them, the readout reads the
    restricted LM head, and verified decoding still equals AR (and speculative runs with zero-padded proposals)."""
    student = DraftStudent(trained.teacher, ChainHead(CONFIG, HeadConfig(num_layers=1, pathway="chain",
                                                                         draft_vocab=40)))
    student.head.load_state_dict(trained.head.state_dict(), strict=False)
    counts = torch.bincount(torch.tensor(sum(PROMPTS, [])), minlength=CONFIG.vocab_size).double()
    counts += torch.linspace(0, 0.5, CONFIG.vocab_size)  # ties broken towards larger ids
    student.head.set_draft_vocab(counts)
    ids = student.head.draft_ids
    assert ids.tolist() == sorted(ids.tolist()) and set(sum(PROMPTS, [])) <= set(ids.tolist())
    feature = torch.randn(3, CONFIG.n_embd)
    with torch.no_grad():
        full = student.teacher.logits(feature)
        torch.testing.assert_close(student.head.readout(student.teacher, feature), full[:, ids])
    for sampling in SAMPLINGS:
        want = generate_ar(student.teacher, PROMPTS, 30, seed=1, **sampling)
        got = generate_with_drafts(student.eval(), PROMPTS, 30, k=4, seed=1, **sampling)
        assert torch.equal(got.tokens, want.tokens)
    drafted = []
    from kforcing.students.draft import decode as draft_decode
    original = draft_decode._DraftDecoder._chain_drafts

    def spy(self, count, distributions):
        out = original(self, count, distributions)
        drafted.append(out[0] if distributions else out)
        return out

    monkeypatch.setattr(draft_decode._DraftDecoder, "_chain_drafts", spy)
    generate_with_drafts(student, PROMPTS, 30, k=4, seed=1, acceptance="speculative")
    assert drafted and all(bool(torch.isin(d, ids).all()) for d in drafted)
    with pytest.raises(ValueError, match="chain pathway only"):
        HeadConfig(pathway="head", draft_vocab=40)
    with pytest.raises(ValueError, match="larger than the teacher's vocabulary"):
        ChainHead(CONFIG, HeadConfig(pathway="chain", draft_vocab=CONFIG.vocab_size + 1))


@pytest.mark.parametrize("draft_vocab", [None, 40])
def test_a_head_with_bf16_weights_drafts_from_them_and_stays_exact(trained, draft_vocab):
    """store_draft_weights(bf16): the fuse, the blocks and the drafts' readout (a bf16 copy of the teacher's
    LM head, restricted or whole) read bf16 weights, the teacher stays fp32, drafts stay close to the fp32 head's
    and verified decoding still equals AR."""
    head = ChainHead(CONFIG, HeadConfig(num_layers=1, pathway="chain", draft_vocab=draft_vocab))
    head.load_state_dict(trained.head.state_dict(), strict=False)
    fp32 = DraftStudent(trained.teacher, head).eval()
    bf16 = DraftStudent(trained.teacher, copy.deepcopy(head)).store_draft_weights(torch.bfloat16).eval()
    assert bf16.head.weight_dtype == torch.bfloat16 and trained.teacher.lm_head.weight.dtype == torch.float32
    feature = torch.randn(5, CONFIG.n_embd)
    with torch.no_grad():
        got, want = bf16.head.readout(bf16.teacher, feature), fp32.head.readout(fp32.teacher, feature)
    assert bf16.head._readout[1].weight.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)  # bf16 weights: about 3 significant digits
    for sampling in SAMPLINGS:
        want = generate_ar(trained.teacher, PROMPTS, 30, seed=4, **sampling)
        for k in (4, None):
            got = generate_with_drafts(bf16, PROMPTS, 30, k=k, seed=4, **sampling)
            assert torch.equal(got.tokens, want.tokens), (sampling, k)
    pinned = [generate_with_drafts(s, PROMPTS, 30, k=4, seed=4).tokens_per_pass for s in (fp32, bf16)]
    assert abs(pinned[0] - pinned[1]) < 0.25 * pinned[0]


def test_adaptive_drafting_weighs_every_draft_count(monkeypatch):
    """A chain round costs more with every draft: with drafts right only at the first offset, adaptive drafting
    settles on one draft a round (not max_k - 1, not AR steps), and the output is still the AR sample."""
    from kforcing.students.draft import decode as draft_decode

    student = _student()
    want = generate_ar(student.teacher, PROMPTS, 72, seed=4).tokens
    starts = torch.tensor([len(p) for p in PROMPTS])

    def first_draft_right(self, exact, count, distributions=False):
        position = self.trunk_cache.seqlens.long()[:, None] + 1 + torch.arange(count)
        drafts = want.gather(1, (position - starts[:, None]).clamp(max=want.shape[1] - 1))
        drafts[:, 1:] = (drafts[:, 1:] + 1) % CONFIG.vocab_size  # every later draft is wrong
        return drafts

    monkeypatch.setattr(draft_decode._DraftDecoder, "draft", first_draft_right)
    got = generate_with_drafts(student, PROMPTS, 64, seed=4, round_costs=(1.0, 3.0))
    assert torch.equal(got.tokens, want[:, :64])
    rounds = got.num_passes - 2 - got.ar_rounds  # the prefill (two passes: ragged prompts) is not a round
    assert got.accepted[0] == pytest.approx(1.0) and got.accepted[1] == 0.0
    assert got.tokens_per_pass > 1.7 and got.ar_rounds < rounds / 4
