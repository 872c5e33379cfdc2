"""kforcing.models.transformer: configs, the two attention paths, the staircase layout, from_teacher, bad input."""

import contextlib
import dataclasses

import pytest
import torch

from conftest import DEVICES
import kforcing_ops
from kforcing.models.transformer import ARModel, ModelConfig, PRESETS
from kforcing.students.push_forward.model import PushForwardLM
from kforcing.workflows.loading import build_model
from kforcing.noise import counter_uniform
from tolerances import GRADIENTS_KERNEL_VS_REFERENCE, KERNEL_VS_REFERENCE, SAME_ROWS_FP32

# The attention and noise-embedding kernels are optional: their reference fallback warns once per process.
pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

TINY = ModelConfig.from_preset("tiny", vocab_size=101, max_seq_len=64)


def make_models(device="cpu", max_k=4, config=TINY, seed=0):
    torch.manual_seed(seed)
    teacher = ARModel(config).to(device).eval()
    student = PushForwardLM.from_teacher(teacher, max_k).eval()
    # The noise MLP starts as the identity (zero output layer): perturb it so the tests exercise all of it.
    with torch.no_grad():
        for p in student.noise.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def uniforms(batch, windows, k, seed=0):
    return counter_uniform(seed, torch.arange(batch)[:, None, None], torch.arange(windows)[None, :, None] * 16
                           + torch.arange(k))


# ---------------------------------------------------------------------------------------------------------
# Config


def test_presets_and_param_counts():
    assert set(PRESETS) == {"tiny", "small", "base"}
    small, base = ModelConfig.from_preset("small"), ModelConfig.from_preset("base")
    assert 22e6 < small.num_params() < 28e6  # "about 25M"
    assert (base.n_layer, base.n_embd, base.n_head) == (12, 768, 12)  # the paper's backbone
    teacher, student = make_models()
    assert teacher.num_params() == TINY.num_params()
    assert student.num_params() == TINY.num_params(max_k=4)
    assert not [name for name, _ in teacher.named_parameters() if name.endswith("bias")]  # no biases


def test_config_round_trip_and_validation():
    config = ModelConfig.from_preset("tiny", vocab_size=300, dropout=0.1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="divisible by n_head"):
        ModelConfig(n_embd=130, n_head=4)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**config.to_dict(), "n_layers": 3})
    with pytest.raises(ValueError, match="positive int"):
        ModelConfig(n_layer=0)


# ---------------------------------------------------------------------------------------------------------
# The two attention paths agree


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_ops_match_reference_ops(device):
    teacher, student = make_models(device)
    ids = torch.randint(0, TINY.vocab_size, (3, 37), device=device)
    u = uniforms(3, 37, 4).to(device)
    tau = torch.tensor([0.7, 1.0, 1.3], device=device)
    window_tokens = torch.randint(0, TINY.vocab_size, (3, 37, 2), device=device)
    outputs = {}
    for backend, ops in (("kforcing_ops", contextlib.nullcontext), ("reference", kforcing_ops.use_reference)):
        with ops():
            outputs[backend] = (teacher(ids), student.forward_train(ids, u, tau, 4),
                                student.forward_train(ids, u[:, :, :2], 0.9, 4, window_tokens=window_tokens))
    for got, want in zip(outputs["kforcing_ops"], outputs["reference"]):
        torch.testing.assert_close(got, want, **KERNEL_VS_REFERENCE)


def test_gradients_match_between_backends():
    _, student = make_models()
    student.train()
    ids = torch.randint(0, TINY.vocab_size, (2, 19))
    u = uniforms(2, 19, 3)
    target = torch.randint(0, TINY.vocab_size, (2, 19, 3))
    grads = {}
    for backend, ops in (("kforcing_ops", contextlib.nullcontext), ("reference", kforcing_ops.use_reference)):
        student.zero_grad()
        with ops():
            logits = student.forward_train(ids, u, 1.0)
        torch.nn.functional.cross_entropy(logits.flatten(0, 2), target.flatten()).backward()
        grads[backend] = {n: p.grad.clone() for n, p in student.named_parameters()}
    for name, grad in grads["kforcing_ops"].items():
        torch.testing.assert_close(grad, grads["reference"][name], **GRADIENTS_KERNEL_VS_REFERENCE, msg=name)
    assert grads["reference"]["noise.weight"].abs().sum() > 0  # the noise encoder is trained
    assert grads["reference"]["tok_emb.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# The layouts


def test_ar_forward_is_causal():
    teacher, _ = make_models()
    ids = torch.randint(0, TINY.vocab_size, (2, 30))
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % TINY.vocab_size
    a, b = teacher(ids), teacher(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_forward_train_windows_see_only_their_context_and_own_earlier_hints():
    _, student = make_models()
    ids = torch.randint(0, TINY.vocab_size, (2, 24))
    u = uniforms(2, 24, 4)
    full = student.forward_train(ids, u, 1.0)
    assert full.shape == (2, 24, 4, TINY.vocab_size)
    t = 9
    # Window t depends on context 0..t only ...
    torch.testing.assert_close(student.forward_train(ids[:, :t + 1], u[:, :t + 1], 1.0)[:, t], full[:, t],
                               **SAME_ROWS_FP32)
    # ... not on other windows' noise ...
    other = u.clone()
    other[:, t + 1:] = 1 - other[:, t + 1:]
    other[:, :t] = 1 - other[:, :t]
    torch.testing.assert_close(student.forward_train(ids, other, 1.0)[:, t], full[:, t], **SAME_ROWS_FP32)
    # ... and hint i depends on u_0..u_i of its window only (causal inside the window: k <= max_k decodes).
    late = u.clone()
    late[:, t, 2:] = 1 - late[:, t, 2:]
    changed = student.forward_train(ids, late, 1.0)[:, t]
    torch.testing.assert_close(changed[:, :2], full[:, t, :2], **SAME_ROWS_FP32)
    assert not torch.allclose(changed[:, 2:], full[:, t, 2:])
    # Fewer hints per window give the same logits for the hints they keep.
    torch.testing.assert_close(student.forward_train(ids, u[:, :, :2], 1.0), full[:, :, :2], **SAME_ROWS_FP32)


def test_hints_carry_the_position_of_the_token_they_predict():
    """Hint 0 of window t is a row at rotary position t+1 that sees context 0..t: if its input vector were the token
    embedding of y (the noise embedding swapped out), its logits would be the AR model's logits after [x_0..x_t, y],
    i.e. the row of a token at position t+1."""
    teacher, student = make_models()
    ids = torch.randint(0, TINY.vocab_size, (1, 12))
    y = torch.randint(0, TINY.vocab_size, (1,))
    student._embed_sequence = lambda ids_, u, tau: torch.cat(
        [teacher.tok_emb(ids_), teacher.tok_emb(y).view(1, 1, -1).expand(ids_.shape[0], u.shape[1], -1)], dim=1)
    t = 5
    ar = teacher(torch.cat([ids[:, :t + 1], y[:, None]], dim=1))[:, -1]
    hint = student.forward_train(ids[:, :t + 1], uniforms(1, t + 1, 1), 1.0)[:, t, 0]
    torch.testing.assert_close(hint, ar, **SAME_ROWS_FP32)


def test_window_tokens_layout_matches_tokens_in_context():
    """Self-forcing pass: m token rows then hints; the hints see the tokens as if they were in the context."""
    _, student = make_models()
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    given = torch.randint(0, TINY.vocab_size, (2, 16, 2))
    u = uniforms(2, 16, 2)
    sf = student.forward_train(ids, u, 0.8, window_size=4, window_tokens=given)
    assert sf.shape == (2, 16, 2, TINY.vocab_size)
    t = 6
    extended = torch.cat([ids[:, :t + 1], given[:, t]], dim=1)  # context ... x_t, y_{t+1}, y_{t+2}
    direct = student.forward_train(extended, u[:, [t] * (t + 3)], 0.8)[:, t + 2]
    torch.testing.assert_close(sf[:, t], direct, **SAME_ROWS_FP32)


def test_tau_is_a_conditioning_input():
    _, student = make_models()
    ids = torch.randint(0, TINY.vocab_size, (2, 10))
    u = uniforms(2, 10, 2)
    a = student.forward_train(ids, u, 1.0)
    b = student.forward_train(ids, u, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


# ---------------------------------------------------------------------------------------------------------
# from_teacher and build_model


def test_from_teacher_copies_every_backbone_weight():
    teacher, student = make_models()
    teacher_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        if name.startswith("noise."):
            continue
        torch.testing.assert_close(value, teacher_state[name], atol=0, rtol=0, msg=name)
    assert {n for n in student.state_dict() if n not in teacher_state} == {
        n for n in student.state_dict() if n.startswith("noise.")}
    # Progressive distillation: a student from a student copies the noise encoder too.
    grown = PushForwardLM.from_teacher(student, 8)
    assert grown.max_k == 8
    torch.testing.assert_close(grown.noise.weight, student.noise.weight, atol=0, rtol=0)
    # The fresh noise MLP starts as the identity, so e = the fused features + Linear.
    fresh = PushForwardLM.from_teacher(teacher, 2)
    u = torch.rand(5, dtype=torch.float64)
    x = torch.nn.functional.linear(
        __import__("kforcing_ops").reference.noise_features(u, 1.0, fresh.noise.num_freqs).float(),
        fresh.noise.weight, fresh.noise.bias)
    torch.testing.assert_close(fresh.embed_noise(u, 1.0), x, **SAME_ROWS_FP32)
    with pytest.raises(TypeError, match="ARModel or PushForwardLM"):
        PushForwardLM.from_teacher(torch.nn.Linear(2, 2), 4)


def test_build_model_round_trip():
    teacher, student = make_models()
    assert isinstance(build_model(teacher.export_config()), ARModel)
    rebuilt = build_model(student.export_config())
    assert isinstance(rebuilt, PushForwardLM) and rebuilt.max_k == 4
    assert rebuilt.config == dataclasses.replace(TINY)
    with pytest.raises(ValueError, match="unknown model_type"):
        build_model({"model_type": "rnn", "model": TINY.to_dict()})
    with pytest.raises(ValueError, match="max_k"):
        build_model({"model_type": "pushforward", "model": TINY.to_dict()})


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_forward_train_bad_input():
    teacher, student = make_models(max_k=2)
    ids = torch.randint(0, TINY.vocab_size, (2, 10))
    with pytest.raises(ValueError, match="max_k=2"):
        student.forward_train(ids, uniforms(2, 10, 3), 1.0)
    with pytest.raises(ValueError, match="window_size=3"):
        student.forward_train(ids, uniforms(2, 10, 2), 1.0, window_size=3)
    with pytest.raises(ValueError, match="num_windows"):
        student.forward_train(ids, uniforms(2, 11, 2), 1.0)
    with pytest.raises(ValueError, match="u"):
        student.forward_train(ids, uniforms(2, 10, 2)[0], 1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        student.forward_train(ids, uniforms(2, 10, 2).half(), 1.0)
    with pytest.raises(ValueError, match="window_tokens"):
        student.forward_train(ids, uniforms(2, 10, 2), 1.0, window_tokens=ids[:, :, None][:, :5])
    with pytest.raises(ValueError, match="tau"):
        student.forward_train(ids, uniforms(2, 10, 2), torch.ones(3))
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        teacher(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 or int32"):
        teacher(ids.float())
    with pytest.raises(ValueError, match="max_k must be a positive int"):
        PushForwardLM(TINY, 0)


def test_casting_a_model_keeps_its_rotary_frequencies_float32():
    """`.to(torch.bfloat16)` / `.half()` cast the weights, not the rotary frequencies: in bf16 they would keep three
    significant digits and the angle at position p would drift by p times that error. Checked on the teacher and on a
    chain head (its own frequencies), and that a later `.float()` leaves them as they were."""
    from kforcing.students.draft.chain_head import ChainHead
    from kforcing.students.draft.student import HeadConfig

    teacher = ARModel(TINY)
    head = ChainHead(TINY, HeadConfig(num_layers=1, pathway="chain"))
    for module in (teacher, head):
        expected = module.inv_freq.clone()
        for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
            cast(module)
            assert module.inv_freq.dtype == torch.float32 and torch.equal(module.inv_freq, expected)
    assert teacher.lm_head.weight.dtype == torch.float32 and head.fuse.weight.dtype == torch.float32
    teacher.to(torch.bfloat16)
    assert teacher.lm_head.weight.dtype == torch.bfloat16  # the weights do take the cast
    positions = torch.tensor([1000.0])
    angle = positions * teacher.inv_freq[1]
    assert abs(angle - positions * teacher.inv_freq[1].to(torch.bfloat16).float()) > 1e-2  # what bf16 would lose
