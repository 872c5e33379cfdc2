"""DraftStudent: teacher-exact token rows, and verified decoding equal to AR sampling token for token."""

import pytest
import torch
from chi_square import chi_square_p_value
from tiny_models import DRAFT_CONFIG as CONFIG
from tiny_models import draft_student, peaked_teacher

from kforcing.decoding.generate import generate_ar, generate_kforcing
from kforcing.noise import counter_uniform
from kforcing.students.draft.decode import generate_with_drafts
from kforcing.students.draft.student import DraftStudent, HeadConfig, HintHead, teacher_fingerprint
from kforcing.students.push_forward.model import PushForwardLM
from kforcing.students.registry import kind_of
from kforcing_ops.nn import DecodeLinear


def _teacher(seed=0):
    return peaked_teacher(seed)


def _student(readout="onehot", num_layers=1, max_k=4, seed=1):
    config = HeadConfig(num_layers=num_layers, max_k=max_k, readout=readout, pathway="head")
    return draft_student(_teacher(), config, seed=seed)


PROMPTS = [[1, 5, 9, 2, 7], [3], [4, 4, 8, 11, 20, 31, 2, 6, 9], [12, 13]]


@pytest.mark.parametrize("readout", ["onehot", "categorical"])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_verified_decoding_equals_ar_sampling(readout, sampling, seed):
    student = _student(readout)
    want = generate_ar(student.teacher, PROMPTS, 40, seed=seed, **sampling)
    got = generate_with_drafts(student, PROMPTS, 40, k=4, seed=seed, verify=True, **sampling)
    assert torch.equal(got.tokens, want.tokens)


def _oracle_drafts(monkeypatch, want, prompts, error_every):
    """Replace the head's drafts by the AR continuation, wrong at a pseudo-random 1/error_every of positions."""
    from kforcing.students.draft import decode as draft_decode

    starts = torch.tensor([len(p) for p in prompts])

    def draft(self, exact, count):
        position = self.head_cache.seqlens.long().cpu()[:, None] + 1 + torch.arange(count)
        index = (position - starts[:, None]).clamp(max=want.shape[1] - 1)
        drafts = want.gather(1, index)
        wrong = counter_uniform(123, torch.arange(len(prompts))[:, None], position) < 1.0 / error_every
        return torch.where(wrong, (drafts + 1) % CONFIG.vocab_size, drafts).to(exact.device)

    monkeypatch.setattr(draft_decode._DraftDecoder, "draft", draft)


@pytest.mark.parametrize("error_every", [1000, 5, 3])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_verification_accepts_rejects_and_rolls_back_exactly(monkeypatch, error_every, sampling):
    student = _student()
    want = generate_ar(student.teacher, PROMPTS, 48, seed=4, **sampling).tokens
    _oracle_drafts(monkeypatch, want, PROMPTS, error_every)
    got = generate_with_drafts(student, PROMPTS, 40, k=4, seed=4, **sampling)
    assert torch.equal(got.tokens, want[:, :40])
    if error_every == 1000:  # perfect drafts: k tokens per pass, every draft accepted
        assert got.accepted == [1.0, 1.0, 1.0] and got.num_passes == 2 + -(-(40 - 1) // 4)  # the ragged prefill is two passes
    else:
        assert 0.0 < got.accepted[-1] <= got.accepted[0] < 1.0 and 1.0 < got.tokens_per_pass < 4.0


@pytest.mark.parametrize("batch_order", [[0, 1, 2, 3], [2, 0, 3, 1], [1]])
def test_verified_decoding_is_independent_of_the_batch(batch_order):
    student = _student()
    full = generate_with_drafts(student, PROMPTS, 30, seed=5)
    part = generate_with_drafts(student, [PROMPTS[i] for i in batch_order], 30, seed=5, sequence_ids=batch_order)
    assert torch.equal(part.tokens, full.tokens[batch_order])


def test_verified_decoding_stops_at_eos_like_ar():
    student = _student()
    want = generate_ar(student.teacher, PROMPTS, 40, seed=3)
    eos = int(want.tokens[0, 6])
    want = generate_ar(student.teacher, PROMPTS, 40, seed=3, eos_id=eos, pad_id=0)
    got = generate_with_drafts(student, PROMPTS, 40, seed=3, eos_id=eos, pad_id=0)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)


def test_unverified_decoding_makes_k_tokens_per_pass_and_starts_exact():
    student = _student()
    out = generate_with_drafts(student, PROMPTS, 33, k=4, seed=0, verify=False)
    ar = generate_ar(student.teacher, PROMPTS, 33, seed=0)
    assert out.num_passes == 2 + -(-(33 - 1) // 4)  # the ragged prefill is two passes, as AR's
    assert torch.equal(out.tokens[:, 0], ar.tokens[:, 0])  # the first token is always the teacher's own


def test_token_rows_are_the_teachers_bit_for_bit():
    student = _student()
    ids = torch.randint(0, CONFIG.vocab_size, (3, 17))
    _, logits = student.trunk(ids)
    assert torch.equal(logits, student.teacher(ids))


def test_head_starts_from_the_teachers_last_blocks_and_keeps_the_teacher_frozen():
    teacher = _teacher()
    student = DraftStudent.from_teacher(teacher, HeadConfig(num_layers=2, pathway="head"))
    assert torch.equal(student.head.blocks[1].mlp.fc.weight, teacher.blocks[-1].mlp.fc.weight)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert student.fingerprint == teacher_fingerprint(_teacher())
    assert student.fingerprint != teacher_fingerprint(_teacher(seed=3))


def test_each_kind_decodes_its_own_student_and_refuses_what_it_cannot():
    student = _student()
    want = generate_ar(student.teacher, PROMPTS, 12, seed=2, temperature=0.7, top_k=20)
    kind = kind_of(student)
    assert kind.name == "draft"
    got = kind.generate(student, PROMPTS, 12, seed=2, temperature=0.7, top_k=20, verify=True)
    assert torch.equal(got.tokens, want.tokens)
    with pytest.raises(ValueError, match="frequency penalty applies to push-forward students"):
        kind.generate(student, PROMPTS, 8, freq_penalty=1.0)
    with pytest.raises(TypeError, match="generate_with_drafts"):
        generate_kforcing(student, PROMPTS, 8)
    pushforward = PushForwardLM.from_teacher(student.teacher, max_k=4)
    assert kind_of(pushforward).name == "pushforward" and kind_of(student.teacher) is None
    with pytest.raises(ValueError, match="verification needs teacher-exact token rows"):
        kind_of(pushforward).generate(pushforward, PROMPTS, 8, verify=True)
    with pytest.raises(ValueError, match="decodes by argmax"):
        kind_of(pushforward).generate(pushforward, PROMPTS, 8, top_k=5)


def test_bad_head_configs_are_refused():
    with pytest.raises(ValueError, match="readout"):
        HeadConfig(readout="argmax")
    with pytest.raises(ValueError, match="max_k must be >= 2"):
        HeadConfig(max_k=1)
    with pytest.raises(ValueError, match="cannot be copied"):
        HintHead(CONFIG, HeadConfig(num_layers=4, pathway="head"))
    with pytest.raises(ValueError, match="k=5"):
        generate_with_drafts(_student(), PROMPTS, 8, k=5)


RAGGED = [[1, 5, 9, 2, 7], [3], [4, 4, 8, 11, 20, 31, 2, 6, 9], [12, 13], [40, 41, 42], [7] * 11, [2, 3], [60]]


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("order, code", [("vocab", "dyadic"), ("descending", "sinusoid"), ("descending", "binary")])
def test_verified_decoding_equals_ar_for_every_order_code_and_batch(batch, order, code):
    config = HeadConfig(num_layers=1, max_k=4, readout="categorical" if code == "binary" else "onehot",
                        noise_code=code, pathway="head")
    student = draft_student(_teacher(), config)
    prompts = RAGGED[:batch]
    for sampling in (dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)):
        want = generate_ar(student.teacher, prompts, 24, seed=5, order=order, **sampling)
        got = generate_with_drafts(student, prompts, 24, seed=5, order=order, **sampling)
        assert torch.equal(got.tokens, want.tokens), (sampling, order, code)
    other = generate_ar(student.teacher, prompts, 24, seed=5, order="vocab" if order == "descending" else
                        "descending", **sampling)
    assert not torch.equal(other.tokens, want.tokens)  # the order changes the map from u to tokens


def test_a_categorical_draft_never_sees_its_own_uniform():
    student = _student("categorical", max_k=4)
    ids = torch.tensor([[3, 8, 1, 9, 4, 4, 2, 7]])
    u = counter_uniform(9, torch.zeros(1, 1, 1, dtype=torch.long), torch.arange(8 * 4).view(1, 8, 4))
    with torch.no_grad():
        stream, logits = student.trunk(ids)
        y1 = logits.argmax(-1)
        base = student.draft_logits(ids, stream, y1, u, 0.7)
        for j in range(2, 5):  # token j's distribution is row j - 2; u[..., j - 1] is token j's uniform
            changed = u.clone()
            changed[..., j - 1] = 1.0 - changed[..., j - 1]
            moved = student.draft_logits(ids, stream, y1, changed, 0.7)
            assert torch.equal(moved[:, :, :j - 1], base[:, :, :j - 1]), j  # tokens <= j: unchanged
            if j < 4:  # u_j conditions the rows of later tokens
                assert not torch.equal(moved[:, :, j - 1], base[:, :, j - 1]), j


def test_unknown_codes_and_orders_are_refused():
    with pytest.raises(ValueError, match="unknown noise_code 'gray'"):
        HeadConfig(noise_code="gray")
    with pytest.raises(ValueError, match="order"):
        generate_ar(_teacher(), PROMPTS, 4, order="ascending")
    with pytest.raises(ValueError, match="unknown CDF order"):
        generate_with_drafts(_student(), PROMPTS, 4, order="ascending")


# --------------------------------------------------------------------------------------------------------
# Adaptive drafting (k=None): drafts only when they pay, AR steps otherwise; always the AR sample


@pytest.mark.parametrize("error_every,costs", [(1, (1.0, 1.5)), (1, (1.0, 1.01)), (1000, (1.0, 1.5)),
                                               (1000, (1.0, 3.5))])
def test_adaptive_drafting_falls_back_to_ar_steps_and_drafts_when_drafts_pay(monkeypatch, error_every, costs):
    """Always-wrong drafts: almost every round becomes an AR step, even when drafting costs hardly more. Always-right
    drafts (4 tokens a round): almost every round drafts, even at 3.5 AR steps a round. Fixed costs keep the choices
    independent of the machine (measured costs are exercised by the tests around)."""
    student = _student()
    want = generate_ar(student.teacher, PROMPTS, 72, seed=4).tokens
    _oracle_drafts(monkeypatch, want, PROMPTS, error_every)
    got = generate_with_drafts(student, PROMPTS, 64, seed=4, round_costs=costs)
    assert torch.equal(got.tokens, want[:, :64])
    rounds = got.num_passes - 2  # the prefill (two passes: ragged prompts) is not a round
    if error_every == 1:
        assert got.ar_rounds >= 0.8 * rounds and got.tokens_per_pass < 1.3
    else:
        assert got.ar_rounds <= rounds / 8 and got.tokens_per_pass > 2.5


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sampling", [dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=1.0),
                                      dict(top_k=1)])
def test_adaptive_drafting_equals_ar_with_ragged_prompts_and_eos(batch, sampling):
    student = _student("categorical")
    prompts = [PROMPTS[i % len(PROMPTS)][: 1 + (3 * i) % 7] for i in range(batch)]
    want = generate_ar(student.teacher, prompts, 30, seed=7, eos_id=3, **sampling)
    for costs in ((1.0, 1.2), (1.0, 100.0), None):  # drafting favoured, AR steps favoured, measured
        got = generate_with_drafts(student, prompts, 30, seed=7, eos_id=3, round_costs=costs, **sampling)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)


def test_adaptive_drafting_options_are_checked():
    from kforcing.students.draft.policy import DraftPolicy

    with pytest.raises(ValueError, match="adaptive drafting only"):
        generate_with_drafts(_student(), PROMPTS, 4, k=4, round_costs=(1.0, 2.0))
    with pytest.raises(ValueError, match="two positive numbers"):
        DraftPolicy(2, 3, "cpu", costs=(1.0,))
    with pytest.raises(ValueError, match="max_drafts"):
        DraftPolicy(2, 0, "cpu")


def test_adaptive_drafting_remembers_what_a_request_learnt(monkeypatch):
    """Later requests of the same student and batch size start from the first one's estimates: with drafts that are
    always wrong they no longer try drafting first, and explore it at the learnt interval, counted across requests
    (a rate that does not restart with every request, and does not stop at one)."""
    student = _student()
    want = generate_ar(student.teacher, PROMPTS, 72, seed=4).tokens
    _oracle_drafts(monkeypatch, want, PROMPTS, 1)
    first = generate_with_drafts(student, PROMPTS, 64, seed=4, round_costs=(1.0, 1.5))
    later = [generate_with_drafts(student, PROMPTS, 64, seed=4, round_costs=(1.0, 1.5)) for _ in range(3)]
    assert all(torch.equal(out.tokens, want[:, :64]) for out in later)
    drafting = lambda out: out.num_passes - 2 - out.ar_rounds  # noqa: E731  (the ragged prefill: 2 passes)
    # An exploration costs 0.5 AR steps for nothing: 2% of the time allows one every 25 rounds.
    assert 1 <= sum(drafting(out) for out in later) <= 3 * 64 // 25 + 1
    assert all(drafting(out) <= drafting(first) for out in later)
    fresh = generate_with_drafts(_student(), PROMPTS, 64, seed=4, round_costs=(1.0, 1.5))  # nothing remembered
    assert drafting(fresh) == drafting(first)


# --------------------------------------------------------------------------------------------------------
# Speculative sampling: lossless in distribution


@pytest.mark.parametrize("rule", ["speculative", "accept_if_more_likely", "residual_is_p"])
def test_speculative_rule_samples_the_teachers_distribution(rule):
    """Hand-set p and q on a 5-token vocabulary, 200,000 rounds of one draft: the token after the exact one follows
    p (chi-square), and two plausible wrong rules are caught by the same test."""
    from kforcing.students.draft.speculative import inverse_cdf, speculative_accept

    gen = torch.Generator().manual_seed(0)
    p1 = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    q1 = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    n = 200_000
    drafts = inverse_cdf(q1.expand(n, 5), torch.rand(n, generator=gen, dtype=torch.float64))[:, None]
    p, q = p1.expand(n, 2, 5), q1.expand(n, 1, 5)
    accept_u, residual_u = torch.rand(n, 1, generator=gen), torch.rand(n, 2, generator=gen)
    if rule == "speculative":
        tokens, _ = speculative_accept(p, q, drafts, accept_u, residual_u)
    elif rule == "accept_if_more_likely":  # keep a draft when p >= q, else sample p: biased
        keep = p1[drafts[:, 0]] >= q1[drafts[:, 0]]
        tokens = torch.where(keep, drafts[:, 0], inverse_cdf(p1.expand(n, 5), residual_u[:, 0]))[:, None]
    else:  # the right acceptance test, but resampling from p instead of the residual: biased
        keep = accept_u[:, 0].double() * q1[drafts[:, 0]] <= p1[drafts[:, 0]]
        tokens = torch.where(keep, drafts[:, 0], inverse_cdf(p1.expand(n, 5), residual_u[:, 0]))[:, None]
    p_value = chi_square_p_value(torch.bincount(tokens[:, 0], minlength=5).double(), p1)
    assert (p_value > 1e-3) if rule == "speculative" else (p_value < 1e-6), p_value


def test_speculative_decoding_samples_the_teacher_and_accepts_drafts():
    """Through generate_with_drafts on the tiny teacher: the first token after the prompt over 4,000 sequences
    follows the teacher's distribution (chi-square), drafts are accepted, and every option combination runs."""
    from kforcing_ops import sampling_probabilities

    student = _student("categorical")
    sampling = dict(temperature=0.8, top_k=20, top_p=0.95)
    prompt = PROMPTS[0]
    batch = 4000
    out = generate_with_drafts(student, [prompt] * batch, 2, k=4, seed=11, acceptance="speculative",
                               sequence_ids=torch.arange(batch), **sampling)
    # A sequence's first token is the teacher's own sample (the prefill); its second is the first the rule decides.
    # Among the sequences that share the most common first token, the second must follow p(. | prompt, first).
    first = out.tokens[:, 0]
    common = int(torch.mode(first).values)
    rows = out.tokens[first == common, 1]
    with torch.no_grad():
        logits = student.teacher(torch.tensor([prompt + [common]]))[0, -1:]
    p = sampling_probabilities(logits, **sampling)[0]
    assert rows.numel() > 500
    assert chi_square_p_value(torch.bincount(rows, minlength=p.shape[0]).double(), p) > 1e-3
    assert out.accepted[0] > 0.0
    with pytest.raises(ValueError, match="verify=True"):
        generate_with_drafts(student, PROMPTS, 4, k=4, verify=False, acceptance="speculative")
    with pytest.raises(ValueError, match="acceptance must be one of"):
        generate_with_drafts(student, PROMPTS, 4, acceptance="greedy")
    adaptive = generate_with_drafts(_student("onehot"), PROMPTS, 12, seed=2, acceptance="speculative")
    assert adaptive.lengths.tolist() == [12] * len(PROMPTS)


@pytest.mark.parametrize("pathway", ["head", "trunk"])
def test_draft_weights_in_bf16_keep_verified_decoding_exact(pathway):
    """store_draft_weights(bf16): a head-pathway head drafts from bf16 weights; a trunk student's adapters, which
    run inside the teacher's pass, stay as they are; verified decoding equals AR either way."""
    student = draft_student(_teacher(), HeadConfig(num_layers=1, max_k=4, readout="categorical", pathway=pathway))
    student.store_draft_weights(torch.bfloat16)
    dtypes = {m.weight.dtype for m in student.head.modules() if isinstance(m, DecodeLinear)}
    assert dtypes == ({torch.bfloat16} if pathway == "head" else {torch.float32})
    assert student.teacher.lm_head.weight.dtype == torch.float32
    for sampling in (dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)):
        want = generate_ar(student.teacher, RAGGED, 24, seed=2, **sampling)
        for k in (4, None):
            assert torch.equal(generate_with_drafts(student, RAGGED, 24, k=k, seed=2, **sampling).tokens, want.tokens)


def test_adaptive_drafting_weighs_the_sequence_that_finishes_last():
    """A static batch ends with its last sequence: with the same tokens left, a sequence whose drafts fail keeps
    the batch on AR steps even though its neighbour's drafts are all accepted (the mean of the two would draft); once
    that sequence is nearly done, the one with most left decides and drafting pays. Fixed costs: AR 1, drafting 2."""
    from kforcing.students.draft.policy import DraftPolicy

    def choice(remaining):
        policy = DraftPolicy(batch=2, max_drafts=3, device="cpu", costs=(1.0, 2.0))
        active = torch.ones(2, dtype=torch.bool)
        policy.observe_acceptance(torch.tensor([[1, 1, 1], [0, 0, 0]]), active)
        return policy.choose(active, torch.tensor(remaining))

    assert choice([30, 30]) == 0   # the failing sequence has as much left: 1 token per 2 (the mean: 2.5 per 2)
    assert choice([30, 1]) == 3    # the accepting one decides: 30 rounds as AR steps, 7.5 drafting
    assert DraftPolicy(batch=1, max_drafts=3, device="cpu", costs=(1.0, 2.0)).choose(
        torch.ones(1, dtype=torch.bool)) == 3  # a fresh estimate is optimistic: every draft accepted


def test_adaptive_drafting_measures_how_far_drafting_moves_the_batchs_finish():
    """Every draft of both sequences is accepted (4 tokens a drafting round each, expected), yet the batch's most
    tokens left falls by 1 a round (its last sequence: here the remaining tokens say so): drafting at cost 2 then
    buys less than AR steps at cost 1, and the policy switches. Where the batch does advance as expected, it keeps
    drafting. Fixed costs: AR 1, drafting 2."""
    from kforcing.students.draft.policy import DraftPolicy

    def run(fall_per_round):
        policy = DraftPolicy(batch=2, max_drafts=3, device="cpu", costs=(1.0, 2.0))
        active, left, kinds = torch.ones(2, dtype=torch.bool), 60, []
        for _ in range(6):
            kind = policy.choose(active, torch.tensor([left, left]))
            kinds.append(kind)
            if kind:
                policy.observe_acceptance(torch.ones(2, 3, dtype=torch.long), active)
            left -= fall_per_round if kind else 1
        return kinds, policy.progress

    kinds, progress = run(fall_per_round=1)
    assert kinds[0] == 3 and kinds[-1] == 0 and progress == 0.0
    kinds, progress = run(fall_per_round=4)
    assert kinds == [3] * 6 and progress == 1.0


def test_adaptive_costs_drop_a_first_timing_and_close_kinds_keep_being_explored(monkeypatch):
    """A kind's first timing (one-off costs) is replaced by its second, not averaged with it; acceptance averages
    its first observations plainly; exploration keeps its interval while exploring costs little, and backs off
    when an exploration is dear."""
    from kforcing.students.draft import policy as draft_policy

    clock = [0.0]
    monkeypatch.setattr(draft_policy.time, "perf_counter", lambda: clock[0])
    policy = draft_policy.DraftPolicy(batch=1, max_drafts=3, device="cpu", explore_every=2)
    active = torch.ones(1, dtype=torch.bool)

    def round_of(kind_seconds, matches=None):
        clock[0] += kind_seconds
        if matches is not None:
            policy.observe_acceptance(torch.tensor([matches]), active)
        return policy.choose(active)

    assert policy.choose(active) == 3                           # untimed: drafting first
    assert round_of(10.0, [1, 1, 0]) == 0                       # the drafting round's first timing: 10 s (one-off)
    round_of(1.0)                                               # an AR step: 1 s
    for _ in range(8):                                          # steady drafting rounds of 2.8 s
        kind = policy._timing[0]
        round_of(2.8 if kind else 1.0, [1, 1, 0] if kind else None)
    assert policy.cost[3] < 3.0 and policy.cost[0] == 1.0      # 10 s was dropped, not averaged in
    torch.testing.assert_close(policy.acceptance[0], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    assert policy.rounds[0] >= 3 and policy.interval == 2      # 3 tokens / 2.8 s vs 1 / 1 s: exploring is cheap
    assert policy._affordable_interval(3) == 2
    policy.cost[0] = 0.3                                        # now AR is far better: a drafting round loses
    assert policy._affordable_interval(0) == draft_policy.MAX_BACKOFF * 2  # 2.8 - 3 x 0.3 s over 2% of 0.3 s: the cap


def test_a_round_that_compiled_is_left_untimed(monkeypatch):
    """A round whose wall time was a compilation (`discard_timing`) gives its kind no cost: the kind is tried again
    and timed then; what compiled requests learn is kept apart from eager ones'."""
    from kforcing.students.draft import policy as draft_policy

    clock = [0.0]
    monkeypatch.setattr(draft_policy.time, "perf_counter", lambda: clock[0])
    student = type("Student", (), {})()  # a key for the policy's memory
    policy = draft_policy.DraftPolicy(batch=1, max_drafts=3, device="cpu", student=student, compiled=True)
    active = torch.ones(1, dtype=torch.bool)
    assert policy.choose(active) == 3                  # untimed: drafting first
    clock[0] += 30.0                                   # ... and it compiled
    policy.discard_timing()
    assert policy.choose(active) == 3 and 3 not in policy.cost  # still untimed: tried again
    clock[0] += 2.0
    assert policy.choose(active) == 0 and policy.cost[3] == 2.0
    clock[0] += 1.0
    policy.choose(active)
    policy.remember()
    assert draft_policy._MEMORY[student].keys() == {(1, 3, True)}
    assert draft_policy.DraftPolicy(batch=1, max_drafts=3, device="cpu", student=student).cost == {}


def test_adaptive_drafting_keeps_timing_the_full_count_while_fewer_drafts_are_best(monkeypatch):
    """With one draft the best count, rounds of max_drafts are still explored: when the far drafts start to be
    accepted and such rounds become cheap (their first timing was a cold one), the policy sees it and takes them."""
    from kforcing.students.draft import policy as draft_policy

    clock = [0.0]
    monkeypatch.setattr(draft_policy.time, "perf_counter", lambda: clock[0])
    policy = draft_policy.DraftPolicy(batch=1, max_drafts=3, device="cpu", explore_every=4, per_draft_cost=True)
    active = torch.ones(1, dtype=torch.bool)
    seconds = {0: 1.0, 1: 1.1, 2: 3.0, 3: 3.0}  # three drafts: as dear as three AR steps, at first
    accepted = [True, False, False]  # and only the first draft is accepted
    taken = []
    for round_index in range(300):
        if round_index == 30:  # now all three are, for a round hardly dearer than one draft's
            seconds[3], accepted = 1.2, [True, True, True]
        kind = policy.choose(active)
        taken.append(kind)
        clock[0] += seconds[kind]
        if kind:
            policy.observe_acceptance(torch.tensor([accepted[:kind]]), active)
    assert taken[10:30].count(1) > taken[10:30].count(3) >= 1  # one draft is best; three are still explored
    # Explored every ~20 rounds, with estimates that blend at 0.1 an observation: it learns, if slowly.
    assert taken[-20:].count(3) >= 16                           # and once they pay, three are what it takes
