"""Hint-head training targets: on-policy teacher targets, a loss that trains the head and only the head."""

import pytest
import torch

from kforcing_ops import reference as ref

from kforcing.students.draft.targets import BOUNDARY_MARGIN, head_step, teacher_rollout
from kforcing.students.draft.student import DraftStudent, HeadConfig, Sampling, sample_rows
from kforcing.models.transformer import ARModel, ModelConfig
from kforcing.noise import counter_uniform

CONFIG = ModelConfig(vocab_size=53, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=64)


def head_onehot(max_k):
    return HeadConfig(num_layers=1, max_k=max_k, readout="onehot", pathway="head")


def _batch(k, batch=4, context=12):
    ids = torch.randint(0, CONFIG.vocab_size, (batch, context), generator=torch.Generator().manual_seed(3))
    u = counter_uniform(11, torch.arange(batch)[:, None, None], torch.arange(context * k).view(1, context, k))
    return ids, u


@pytest.mark.parametrize("readout", ["onehot", "categorical"])
def test_head_step_fits_a_batch_and_trains_only_the_head(readout):
    torch.manual_seed(0)
    student = DraftStudent.from_teacher(ARModel(CONFIG).eval(), HeadConfig(num_layers=1, max_k=3, readout=readout,
                                                                               pathway="head"))
    teacher_before = {n: p.clone() for n, p in student.teacher.state_dict().items()}
    ids, u = _batch(3)
    optimizer = torch.optim.Adam(student.head.parameters(), lr=3e-3)
    history = []
    for _ in range(60):
        loss, metrics = head_step(student, ids, u, Sampling(0.8, 0, 1.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics)
    first, last = history[0], history[-1]
    assert last["loss"] < (0.95 if readout == "onehot" else 0.5) * first["loss"]
    # The on-policy acceptance is what verified decoding gets on these windows: the head learned them.
    assert last["tokens_per_pass"] > first["tokens_per_pass"] + (0.5 if readout == "onehot" else 0.1)
    assert len(last["acceptance"]) == 2
    assert all(torch.equal(p, teacher_before[n]) for n, p in student.teacher.state_dict().items())


def test_onehot_targets_are_the_teachers_tokens_after_the_window_so_far():
    torch.manual_seed(0)
    student = DraftStudent.from_teacher(ARModel(CONFIG).eval(), head_onehot(max_k=3))
    ids, u = _batch(3, batch=2, context=5)
    window = torch.randint(0, CONFIG.vocab_size, (2, 5, 2))
    logits = student.teacher_window_logits(ids, window)
    for t in range(5):  # window t: context 0..t, then its tokens; each row's logits equal a plain causal pass
        seq = torch.cat([ids[:, :t + 1], window[:, t]], dim=1)
        torch.testing.assert_close(logits[:, t], student.teacher(seq)[:, t + 1:], atol=1e-5, rtol=1e-5)
    tokens = sample_rows(logits, u[..., 1:], Sampling())
    assert tokens.shape == (2, 5, 2)


def test_boundary_weighting_keeps_the_teachers_tokens_and_moves_u_toward_their_interval_ends():
    torch.manual_seed(0)
    student = DraftStudent.from_teacher(ARModel(CONFIG).eval(), head_onehot(max_k=4))
    ids, u = _batch(4, batch=3, context=10)
    sampling = Sampling(0.7, 20, 0.9, "descending")
    y1 = sample_rows(student.teacher(ids), u[..., 0], sampling)
    draws = torch.distributions.Beta(0.2, 0.2).sample(u.shape).double()
    with torch.no_grad():
        tokens, logits, u_uniform = teacher_rollout(student, ids, y1, u, sampling)
        moved_tokens, moved_logits, moved = teacher_rollout(student, ids, y1, u, sampling, boundary=draws)
    assert u_uniform is u and torch.equal(moved[..., 0], u[..., 0])  # y1's uniform is never moved
    assert torch.equal(moved_tokens, tokens) and torch.equal(moved_logits, logits)
    # Each moved uniform sits where its draw puts it inside its token's interval, and still samples that token.
    targets = sample_rows(logits, u[..., 1:], sampling)
    assert torch.equal(sample_rows(logits, moved[..., 1:], sampling), targets)
    flat = logits.reshape(-1, CONFIG.vocab_size)
    lower, upper = ref.cdf_interval(flat, targets.reshape(-1), 0.7, 20, 0.9, "descending")
    share = (moved[..., 1:].reshape(-1) - lower) / (upper - lower)
    # The rollout placed u_j from the logits of the pass that had j window tokens; `logits` are the last pass's, whose
    # rows are the same up to float32 rounding (a pass above 64 rows runs torch's GEMM, a smaller one decode_linear).
    torch.testing.assert_close(share, draws[..., 1:].reshape(-1).clamp(BOUNDARY_MARGIN, 1 - BOUNDARY_MARGIN),
                               atol=1e-5, rtol=0)
    # Beta(0.2, 0.2) puts most uniforms near an end of their interval; uniform u does not.
    uniform_share = (u[..., 1:].reshape(-1) - lower) / (upper - lower)
    assert (torch.minimum(share, 1 - share) < 0.1).double().mean() > 0.6
    assert (torch.minimum(uniform_share, 1 - uniform_share) < 0.1).double().mean() < 0.4


def test_boundary_weighting_trains_and_is_refused_where_it_cannot_apply():
    torch.manual_seed(0)
    ids, u = _batch(3)
    draws = torch.distributions.Beta(0.5, 0.5).sample(u.shape).double()
    onehot = DraftStudent.from_teacher(ARModel(CONFIG).eval(), head_onehot(max_k=3))
    loss, metrics = head_step(onehot, ids, u, Sampling(0.8), "teacher", boundary=draws)
    loss.backward()
    assert torch.isfinite(loss) and len(metrics["acceptance"]) == 2
    with pytest.raises(ValueError, match="boundary weighting needs the onehot readout on teacher windows"):
        head_step(onehot, ids, u, Sampling(0.8), "student", boundary=draws)
    categorical = DraftStudent.from_teacher(ARModel(CONFIG).eval(),
                                            HeadConfig(num_layers=1, max_k=3, pathway="head"))
    with pytest.raises(ValueError, match="boundary weighting needs the onehot readout"):
        head_step(categorical, ids, u, Sampling(0.8), "teacher", boundary=draws)
