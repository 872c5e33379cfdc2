"""The onepass pathway: a round's drafts come from hint sets in the teacher's own verify call, one set per number of
drafts that may stand, each masked to its accepted prefix; verified output equals AR's token for token."""

import pytest
import torch
from tiny_models import DRAFT_CONFIG, draft_student, peaked_teacher

import kforcing_ops
from kforcing.decoding.generate import generate_ar
from kforcing.models.transformer import KVCache
from kforcing.noise import counter_uniform
from kforcing.students.draft import decode as draft_decode
from kforcing.students.draft.decode import generate_with_drafts
from kforcing.students.draft.student import HeadConfig, Sampling

RAGGED = [[1, 5, 9, 2, 7], [3], [4, 4, 8, 11, 20, 31, 2, 6, 9], [12, 13], [40, 41, 42], [7] * 11, [2, 3], [60]]
SAMPLINGS = [dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=1.0), dict(top_k=1)]


@pytest.fixture(scope="module")
def student():
    return draft_student(peaked_teacher(), HeadConfig(max_k=4, pathway="onepass", adapter_rank=4))


def _oracle_hint_sets(monkeypatch, want, prompts, error_every):
    """Make every hint set draft the AR continuation at its own positions (wrong at a pseudo-random 1/error_every
    of them): a set the round reads for the wrong accepted count drafts the wrong positions, and stops standing."""
    starts = torch.tensor([len(p) for p in prompts])
    one_pass = draft_decode._DraftDecoder.one_pass

    def oracle(self, exact, drafts):
        features, logits, hint_logits = one_pass(self, exact, drafts)
        batch, sets, rows, vocab = hint_logits.shape
        start = self.trunk_cache.seqlens.long()[:, None, None]
        position = start + 2 + torch.arange(sets)[:, None] + torch.arange(rows)  # of the token each row drafts
        index = (position - starts[:, None, None]).clamp(0, want.shape[1] - 1)
        tokens = want.gather(1, index.flatten(1)).view(batch, sets, rows)
        wrong = counter_uniform(99, torch.arange(batch)[:, None, None], position) < 1.0 / error_every
        tokens = torch.where(wrong, (tokens + 1) % vocab, tokens)
        return features, logits, torch.nn.functional.one_hot(tokens, vocab).to(hint_logits.dtype) * 1e4

    monkeypatch.setattr(draft_decode._DraftDecoder, "one_pass", oracle)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_verified_onepass_decoding_equals_ar_with_ragged_prompts_and_eos(student, batch, sampling):
    prompts = RAGGED[:batch]
    want = generate_ar(student.teacher, prompts, 30, seed=7, eos_id=3, **sampling)
    for k in (2, 4, None):
        got = generate_with_drafts(student, prompts, 30, k=k, seed=7, eos_id=3, **sampling)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths), k


@pytest.mark.parametrize("error_every", [1000, 4])
def test_the_hint_set_of_the_accepted_count_drafts_the_next_round(monkeypatch, student, error_every):
    """With oracle hint sets, every draft after the first round stands (k tokens a round) when the oracle is never
    wrong; with errors, rounds accept part of their drafts and the next round must read the set of that count.
    Either way the output is AR's."""
    sampling = SAMPLINGS[0]
    prompts = RAGGED[:4]
    want = generate_ar(student.teacher, prompts, 48, seed=4, **sampling).tokens
    _oracle_hint_sets(monkeypatch, want, prompts, error_every)
    got = generate_with_drafts(student, prompts, 40, k=4, seed=4, **sampling)
    assert torch.equal(got.tokens, want[:, :40])
    if error_every == 1000:  # the first round verifies stand-ins (not counted); every later draft stands
        assert got.num_passes <= 2 + 1 + -(-(40 - 2) // 4) and got.accepted == [1.0, 1.0, 1.0]
    else:
        assert 0.0 < got.accepted[-1] < got.accepted[0] < 1.0 and got.tokens_per_pass > 2.0


def test_unverified_onepass_decoding_never_keeps_a_stand_in(student):
    """The round after the prompt has no drafts yet: it is verified whatever was asked (its stand-ins are no
    drafts), so the first two tokens are the teacher's; every later round keeps its k-1 drafts and the teacher's
    token after them."""
    prompts = RAGGED[:3]
    want = generate_ar(student.teacher, prompts, 30, seed=2, **SAMPLINGS[1])
    got = generate_with_drafts(student, prompts, 30, k=4, seed=2, verify=False, **SAMPLINGS[1])
    assert torch.equal(got.tokens[:, :2], want.tokens[:, :2])
    assert got.num_passes == 2 + 1 + -(-(30 - 2) // 4)  # the ragged prefill is two passes, as AR's


def test_a_hint_set_sees_its_accepted_prefix_and_nothing_else(student):
    """Set a's draft logits in the one call equal the hint rows run alone against a cache that holds the prefix,
    the exact token and drafts 1..a (what the cache holds when a drafts stand)."""
    teacher, head = student.teacher, student.head
    prompts = [[1, 5, 9, 2, 7, 8], [3, 4], [4, 4, 8, 11]]
    sampling = Sampling(0.7, 20, 0.9, "vocab")
    lengths = torch.tensor([len(p) for p in prompts])
    decoder = draft_decode._DraftDecoder(student, 3, 32, 5, torch.arange(3), sampling, None, 0, set_rows=3)
    ids = torch.zeros(3, 6, dtype=torch.int64)
    for b, prompt in enumerate(prompts):
        ids[b, :len(prompt)] = torch.tensor(prompt)
    decoder.trunk(ids)
    decoder.trunk_cache.seqlens.copy_(lengths.int())
    exact, drafts = torch.tensor([10, 20, 30]), torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]])
    _, logits, hint_logits = decoder.one_pass(exact, drafts)
    assert torch.equal(decoder.trunk_cache.seqlens, lengths.int())  # the round moves the lengths, not the call
    verify = torch.cat([exact[:, None], drafts], dim=1)
    for a in range(4):
        cache = KVCache.for_model(teacher, 3, 32)
        for layer in range(teacher.config.n_layer):  # the prompt's rows, then the verify rows 0..a
            cache.k[layer].copy_(decoder.trunk_cache.k[layer])
            cache.v[layer].copy_(decoder.trunk_cache.v[layer])
        cache.seqlens.copy_(lengths.int() + 1 + a)
        positions = cache.seqlens.long()[:, None] + torch.arange(3)
        u = decoder.uniforms(positions, decoder.hint_table)
        x = student.hint_rows(u, sampling.temperature)

        def attend(layer, q, k, v):
            return kforcing_ops.window_attention_decode(q, k, v, cache.k[layer], cache.v[layer], cache.seqlens, 0)

        alone = head.readout(teacher, head.run(teacher, x[:, None], positions, attend, n_token=0)[:, 0], 0)
        torch.testing.assert_close(hint_logits[:, a], alone, rtol=1e-4, atol=1e-4)
    # the verify rows are the teacher's own pass over [exact | drafts]
    for b, n in enumerate(lengths.tolist()):
        full = teacher(torch.cat([ids[b:b + 1, :n], verify[b:b + 1]], dim=1))[0, n:]
        torch.testing.assert_close(logits[b], full, rtol=1e-4, atol=1e-4)


def test_a_onepass_round_reads_each_teacher_weight_once(student):
    """The verify rows and every hint set share one call of each teacher linear layer (the design's point: one
    read of the teacher's weights a round); a trunk student's round calls each twice."""
    teacher = student.teacher
    calls = {}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, module in teacher.named_modules() if isinstance(module, torch.nn.Linear)]
    try:
        decoder = draft_decode._DraftDecoder(student, 2, 32, 0, torch.arange(2), Sampling(1.0, 0, 1.0, "vocab"),
                                             None, 0, set_rows=3)
        decoder.trunk(torch.tensor([[1, 2, 3], [4, 5, 6]]))
        decoder.trunk_cache.seqlens.fill_(3)
        calls.clear()
        decoder.one_pass(torch.tensor([7, 8]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    finally:
        for hook in hooks:
            hook.remove()
    linears = 4 * DRAFT_CONFIG.n_layer + 1  # q/k/v, out, both MLP layers per block, and the LM head
    assert len(calls) == linears and set(calls.values()) == {1}, calls


def test_onepass_needs_the_categorical_readout():
    with pytest.raises(ValueError, match="categorical"):
        HeadConfig(max_k=4, pathway="onepass", readout="onehot")
