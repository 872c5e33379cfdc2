"""Hint-head training targets: on-policy teacher targets, a loss that trains the head and only the head."""

import pytest
import torch

from kforcing.head_targets import head_step
from kforcing.hint_head import DraftStudent, HeadConfig, Sampling, sample_rows
from kforcing.model import ARModel, ModelConfig
from kforcing.noise import counter_uniform

CONFIG = ModelConfig(vocab_size=53, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=64)


def _batch(k, batch=4, context=12):
    ids = torch.randint(0, CONFIG.vocab_size, (batch, context), generator=torch.Generator().manual_seed(3))
    u = counter_uniform(11, torch.arange(batch)[:, None, None], torch.arange(context * k).view(1, context, k))
    return ids, u


@pytest.mark.parametrize("readout", ["onehot", "categorical"])
def test_head_step_fits_a_batch_and_trains_only_the_head(readout):
    torch.manual_seed(0)
    student = DraftStudent.from_teacher(ARModel(CONFIG).eval(), HeadConfig(num_layers=1, max_k=3, readout=readout))
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
    student = DraftStudent.from_teacher(ARModel(CONFIG).eval(), HeadConfig(num_layers=1, max_k=3))
    ids, u = _batch(3, batch=2, context=5)
    window = torch.randint(0, CONFIG.vocab_size, (2, 5, 2))
    logits = student.teacher_window_logits(ids, window)
    for t in range(5):  # window t: context 0..t, then its tokens; each row's logits equal a plain causal pass
        seq = torch.cat([ids[:, :t + 1], window[:, t]], dim=1)
        torch.testing.assert_close(logits[:, t], student.teacher(seq)[:, t + 1:], atol=1e-5, rtol=1e-5)
    tokens = sample_rows(logits, u[..., 1:], Sampling())
    assert tokens.shape == (2, 5, 2)
