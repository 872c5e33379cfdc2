"""The trunk pathway of a DraftStudent: hint rows through the teacher's own blocks with row-gated adapters.

Token rows stay the teacher's bit for bit whatever the adapters hold; at initialisation the hint rows compute what
the teacher's weights compute; verified decoding equals AR sampling token for token; only the adapters train.
"""

import pytest
import torch
from tiny_models import DRAFT_CONFIG as CONFIG
from tiny_models import draft_student, peaked_teacher

import kforcing_ops
from kforcing.decoding.generate import generate_ar
from kforcing.models.transformer import KVCache, decode_blocks, run_blocks
from kforcing.noise import counter_uniform
from kforcing.students.draft.decode import generate_with_drafts
from kforcing.students.draft.student import DraftStudent, HeadConfig, HintHead, Sampling, sample_rows
from kforcing.students.draft.targets import head_step
from kforcing.students.draft.trunk_adapters import GatedLoRALinear, TrunkAdapters

RANKS = [1, 4, 0]  # rank-1 and rank-4 LoRA, and 0: full copies of the blocks
READOUTS = ["onehot", "categorical"]
PROMPTS = [[1, 5, 9, 2, 7], [3], [4, 4, 8, 11, 20, 31, 2, 6, 9]]  # a ragged batch of 3


def _config(rank, readout="onehot", max_k=4):
    return HeadConfig(max_k=max_k, readout=readout, pathway="trunk", adapter_rank=rank)


def _batch(k, batch=3, context=10):
    ids = torch.randint(0, CONFIG.vocab_size, (batch, context), generator=torch.Generator().manual_seed(3))
    u = counter_uniform(11, torch.arange(batch)[:, None, None], torch.arange(context * k).view(1, context, k))
    return ids, u


def _y1(student, ids, u, sampling=Sampling()):
    stream, logits = student.trunk(ids)
    return stream, sample_rows(logits, u[..., 0], sampling)


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("rank", RANKS)
def test_token_rows_are_the_teachers_bit_for_bit_with_random_adapters(rank, readout):
    teacher = peaked_teacher()
    student = draft_student(teacher, _config(rank, readout), scale=0.2)
    lora = [m for m in student.head.modules() if isinstance(m, GatedLoRALinear)]
    assert all(bool(m.lora_B.abs().sum() > 0) for m in lora)  # the adapters really change the hint rows
    ids, u = _batch(4)
    stream, logits = student.trunk(ids)
    assert torch.equal(logits, teacher(ids))
    assert len(stream.keys) == len(stream.values) == CONFIG.n_layer
    # The y1 row is a token row inside its window: its categorical distribution is the teacher's given y1.
    if readout == "categorical":
        y1 = sample_rows(logits, u[..., 0], Sampling())
        drafts = student.draft_logits(ids, stream, y1, u, 1.0)
        want = student.teacher_window_logits(ids, y1[..., None])[:, :, 0]
        torch.testing.assert_close(drafts[:, :, 0], want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("rank", RANKS)
def test_at_initialisation_hint_rows_run_the_teachers_weights(rank, readout):
    teacher = peaked_teacher()
    student = DraftStudent.from_teacher(teacher, _config(rank, readout))  # B = 0, or copies of the teacher
    ids, u = _batch(4)
    stream, y1 = _y1(student, ids, u)
    got = student.draft_logits(ids, stream, y1, u, 0.8)

    # The same rows through the teacher's own blocks, final norm and LM head, in one staircase pass.
    window_x = student.window_inputs(y1, u, 0.8)
    windows, rows = window_x.shape[1], window_x.shape[2]
    x = torch.cat([teacher.tok_emb(ids), window_x.flatten(1, 2)], dim=1)
    positions = student.staircase_positions(ids.shape[1], windows, rows, ids.device)
    hidden = run_blocks(teacher.blocks, x, positions, teacher.inv_freq,
                        lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, windows, rows))
    hidden = hidden[:, ids.shape[1]:].view(*window_x.shape)
    if readout == "onehot":
        hidden = hidden[:, :, 1:]
    torch.testing.assert_close(got, teacher.lm_head(teacher.norm(hidden)), atol=1e-4, rtol=1e-5)

    # Layer by layer: a zero LoRA update adds exact zeros; a full copy holds the teacher's weights.
    layer, base = student.head.layers[0], teacher.blocks[0].attn.wqkv
    x = torch.randn(2, 3, 4, CONFIG.n_embd)
    if rank:
        assert torch.equal(layer.wqkv(base, x, 1), base(x))
    else:
        assert torch.equal(layer.wqkv.copy.weight, base.weight)
        torch.testing.assert_close(layer.wqkv(base, x, 1), base(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("rank", [4, 0])
def test_decoding_draft_rows_match_the_training_layout(rank, readout):
    """The draft pass against the teacher's KV cache computes what the staircase pass computes for the last window."""
    teacher = peaked_teacher()
    student = draft_student(teacher, _config(rank, readout))
    ids, u = _batch(4, context=7)
    stream, y1 = _y1(student, ids, u)
    want = student.draft_logits(ids, stream, y1, u, 1.0)[:, -1]
    cache = KVCache.for_model(teacher, ids.shape[0], 32)
    decode_blocks(teacher.blocks, teacher.tok_emb(ids), cache, ids.shape[1], teacher.inv_freq)
    x = student.window_inputs(y1[:, -1:], u[:, -1:], 1.0)[:, 0]
    got = student.readout_logits(student.decode_window(x, cache))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert cache.seqlens.tolist() == [ids.shape[1]] * ids.shape[0]  # draft rows append nothing


CASES = [  # (adapter_rank, readout, sampling, seed)
    (1, "onehot", dict(temperature=1.0), 0),
    (4, "categorical", dict(temperature=0.7, top_k=20, top_p=0.9), 1),
    (0, "onehot", dict(temperature=0.7, top_k=20, top_p=0.9), 2),
    (0, "categorical", dict(temperature=1.0), 3),
    (4, "onehot", dict(temperature=0.7), 4),
    (1, "categorical", dict(temperature=1.0, top_p=0.8), 5),
]


@pytest.mark.parametrize("rank, readout, sampling, seed", CASES)
def test_verified_decoding_equals_ar_sampling(rank, readout, sampling, seed):
    student = draft_student(peaked_teacher(), _config(rank, readout), seed=seed)
    want = generate_ar(student.teacher, PROMPTS, 30, seed=seed, **sampling)
    got = generate_with_drafts(student, PROMPTS, 30, k=4, seed=seed, verify=True, **sampling)
    assert torch.equal(got.tokens, want.tokens)
    if readout == "categorical":  # draft 2 comes from the exact y1 row: the teacher's own token
        assert got.accepted[0] == 1.0 and got.tokens_per_pass > 1.5


@pytest.mark.parametrize("rank, readout", [(4, "onehot"), (0, "categorical")])
def test_verified_decoding_stops_at_eos_like_ar(rank, readout):
    student = draft_student(peaked_teacher(), _config(rank, readout))
    eos = int(generate_ar(student.teacher, PROMPTS, 30, seed=3).tokens[0, 6])
    want = generate_ar(student.teacher, PROMPTS, 30, seed=3, eos_id=eos, pad_id=0)
    got = generate_with_drafts(student, PROMPTS, 30, k=3, seed=3, eos_id=eos, pad_id=0)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert int(got.lengths[0]) == 7


def test_verified_decoding_of_a_trunk_student_equals_ar():
    student = draft_student(peaked_teacher(), _config(4, "categorical"))
    want = generate_ar(student.teacher, PROMPTS, 12, seed=2, temperature=0.7, top_k=20)
    got = generate_with_drafts(student, PROMPTS, 12, seed=2, temperature=0.7, top_k=20, verify=True)
    assert torch.equal(got.tokens, want.tokens)


def test_dropout_leaves_the_y1_row_exact():
    teacher = peaked_teacher()
    config = HeadConfig(max_k=3, readout="categorical", pathway="trunk", adapter_rank=4)
    student = DraftStudent.from_teacher(teacher, config)
    for module in student.head.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    student.head.train()
    ids, u = _batch(3)
    stream, y1 = _y1(student, ids, u)
    rows = student.draft_logits(ids, stream, y1, u, 1.0)
    torch.testing.assert_close(rows[:, :, 0], student.teacher_window_logits(ids, y1[..., None])[:, :, 0],
                               atol=1e-4, rtol=1e-5)
    assert not torch.allclose(rows[:, :, 1], student.eval().draft_logits(ids, stream, y1, u, 1.0)[:, :, 1])


@pytest.mark.parametrize("rank, readout", [(1, "onehot"), (0, "categorical")])
def test_unverified_decoding_makes_k_tokens_per_pass(rank, readout):
    student = draft_student(peaked_teacher(), _config(rank, readout))
    out = generate_with_drafts(student, PROMPTS, 33, k=4, seed=0, verify=False)
    ar = generate_ar(student.teacher, PROMPTS, 33, seed=0)
    assert out.num_passes == 2 + -(-(33 - 1) // 4) and out.tokens_per_pass == pytest.approx(33 / out.num_passes)
    assert torch.equal(out.tokens[:, 0], ar.tokens[:, 0])  # the first token is always the teacher's own


@pytest.mark.parametrize("rank, readout", [(4, "onehot"), (0, "categorical")])
def test_head_step_trains_only_the_adapters(rank, readout):
    student = DraftStudent.from_teacher(peaked_teacher(), _config(rank, readout, max_k=3))
    teacher_before = {n: p.clone() for n, p in student.teacher.state_dict().items()}
    ids, u = _batch(3)
    optimizer = torch.optim.Adam(student.head.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, metrics = head_step(student, ids, u, Sampling(0.8, 0, 1.0))
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is None for p in student.teacher.parameters())
            assert all(p.grad is not None for p in student.head.parameters())
            assert student.head.noise.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(metrics["loss"])
    assert losses[-1] < losses[0] and len(metrics["acceptance"]) == 2
    assert all(torch.equal(p, teacher_before[n]) for n, p in student.teacher.state_dict().items())


def test_the_adapters_hold_every_trainable_parameter_and_none_of_the_teacher():
    teacher = peaked_teacher()
    student = draft_student(teacher, _config(4))
    state = student.head.state_dict()
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    assert not any(value.data_ptr() in teacher_storage for value in state.values())
    assert any(name.endswith("lora_B") for name in state) and any(name.startswith("noise.") for name in state)
    # A fresh student of the same teacher loads the state and drafts the same tokens.
    again = DraftStudent.from_teacher(teacher, HeadConfig.from_dict(student.head_config.to_dict()))
    again.head.load_state_dict(state)
    first = generate_with_drafts(student, PROMPTS, 12, seed=1, verify=False)
    second = generate_with_drafts(again.eval(), PROMPTS, 12, seed=1, verify=False)
    assert torch.equal(first.tokens, second.tokens)
    # Full copies: per block, trainable copies of both norms and the four linear layers.
    full = DraftStudent.from_teacher(teacher, _config(0)).head
    assert sum(p.numel() for p in full.layers.parameters()) == sum(p.numel() for p in teacher.blocks.parameters())


def test_head_config_round_trips_and_old_checkpoints_default_to_the_head_pathway():
    config = _config(0, "categorical")
    assert HeadConfig.from_dict(config.to_dict()) == config
    old = {key: value for key, value in HeadConfig().to_dict().items()
           if key not in ("pathway", "adapter_rank", "readout")}
    assert (HeadConfig.from_dict(old).pathway, HeadConfig.from_dict(old).readout) == ("head", "onehot")
    assert HeadConfig.from_dict(old).adapter_rank == 8  # the default of the kforcing that wrote it
    assert (HeadConfig().pathway, HeadConfig().readout) == ("trunk", "categorical")


def test_the_default_adapters_are_full_copies_and_checkpoints_record_the_rank():
    teacher = peaked_teacher()
    student = DraftStudent.from_teacher(teacher, HeadConfig(max_k=3))
    assert HeadConfig().adapter_rank is None and TrunkAdapters.DEFAULT_RANK == 0
    assert student.head_config.adapter_rank == 0  # resolved when built, so a checkpoint names it
    assert not any(isinstance(m, GatedLoRALinear) for m in student.head.modules())
    assert sum(p.numel() for p in student.head.layers.parameters()) == sum(
        p.numel() for p in teacher.blocks.parameters())
    assert HeadConfig.from_dict(student.head.export_config()["head"]).adapter_rank == 0


def test_bad_trunk_configs_are_refused():
    with pytest.raises(ValueError, match=r"adapter_rank=33 is larger than the model width n_embd=32"):
        DraftStudent.from_teacher(peaked_teacher(), _config(33))
    with pytest.raises(ValueError, match="unknown pathway 'branch'"):
        HeadConfig(pathway="branch")
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="adapter_rank must be an int >= 0"):
            HeadConfig(pathway="trunk", adapter_rank=bad)
    with pytest.raises(ValueError, match="'head' pathway"):
        HintHead(CONFIG, _config(4))
    with pytest.raises(ValueError, match="'trunk' and 'onepass' pathways"):
        TrunkAdapters(CONFIG, HeadConfig(pathway="head"))
    adapters = TrunkAdapters.from_teacher(peaked_teacher(), _config(4))
    adapters.config = HeadConfig(pathway="head")  # a trunk module that claims the head pathway
    with pytest.raises(TypeError, match="needs a HintHead"):
        DraftStudent(peaked_teacher(), adapters)
