"""noise_embedding and noise_conditioned_embedding: kernels against float64, gradients, assembly, bad input."""

import itertools
import math

import pytest
import torch
from conftest import DEVICES, expect_kernel
from tolerances import EMBEDDING_FP32_RTOL, assert_within_pytorch_error

import kforcing_ops as ko
from kforcing_ops import reference as ref
from kforcing_ops.nn import NoiseEmbedding

DTYPES = {"cpu": [torch.float32, torch.bfloat16, torch.float16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}
ROWS, FREQS, HIDDEN = [0, 1, 37, 1000], [8, 32, 384], [16, 48, 768]


def uniforms(rows, device, dtype=torch.float32):
    u = torch.rand(rows, device=device, dtype=dtype)
    if rows >= 3:
        u[0], u[1] = 0.0, 1.0  # the interval's ends are valid inputs
    return u


def weights(hidden, freqs, dtype, device):
    w = torch.randn(hidden, 4 * freqs, device=device) * 0.05
    return w.to(dtype), (torch.randn(hidden, device=device) * 0.1).to(dtype)


def embedding_cases():
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for dtype in DTYPES[device]:
            shapes = list(itertools.product(ROWS, FREQS, HIDDEN))
            for shape in (shapes if dtype == torch.float32 else shapes[::4]):
                yield pytest.param(device, dtype, *shape, marks=marks, id=f"{device}-{str(dtype)[6:]}-{shape}")


def check_against_float64(got, u, tau, weight, bias, dtype, code="sinusoid"):
    exact = ref.noise_embedding(u.double(), tau.double() if isinstance(tau, torch.Tensor) else tau, weight.double(),
                                bias.double(), code)
    if got.numel() == 0:
        return
    if dtype in (torch.float32, torch.float64):
        assert (got.double() - exact).abs().max() <= EMBEDDING_FP32_RTOL * exact.abs().max()
    else:  # plain PyTorch in the same precision: features cast to dtype, then Linear in dtype
        assert_within_pytorch_error(got, ref.noise_embedding(u, tau, weight, bias, code), exact, dtype,
                                    "noise_embedding")


@pytest.mark.parametrize("device,dtype,rows,freqs,hidden", list(embedding_cases()))
@pytest.mark.parametrize("per_row_tau", [False, True])
def test_noise_embedding_matches_float64(device, dtype, rows, freqs, hidden, per_row_tau):
    u = uniforms(rows, device)
    tau = torch.rand(rows, device=device) * 2 if per_row_tau else 0.8
    weight, bias = weights(hidden, freqs, dtype, device)
    with expect_kernel("noise_embedding"):
        got = ko.noise_embedding(u, tau, weight, bias)
    assert got.shape == (rows, hidden) and got.dtype == dtype
    check_against_float64(got, u, tau, weight, bias, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_uniforms_and_no_bias(device):
    u = uniforms(50, device, torch.float64)
    weight, _ = weights(24, 16, torch.float32, device)
    got = ko.noise_embedding(u, torch.tensor(0.5, device=device), weight)
    exact = ref.noise_embedding(u, 0.5, weight.double())
    assert (got.double() - exact).abs().max() <= EMBEDDING_FP32_RTOL * exact.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau_kind", ["float", "per_sequence"])
def test_noise_conditioned_is_tokens_then_noise(device, dtype, tau_kind):
    batch, contexts, hints, vocab, hidden, freqs = 3, 7, 12, 50, 48, 16
    ids = torch.randint(0, vocab, (batch, contexts), device=device)
    table = (torch.randn(vocab, hidden, device=device) * 0.1).to(dtype)
    u = torch.rand(batch, hints, device=device)
    tau = 0.9 if tau_kind == "float" else torch.rand(batch, device=device)
    weight, bias = weights(hidden, freqs, dtype, device)
    with expect_kernel("noise_conditioned_embedding"):
        got = ko.noise_conditioned_embedding(ids, table, u, tau, weight, bias)
    assert got.shape == (batch, contexts + hints, hidden)
    assert torch.equal(got[:, :contexts], table[ids])
    tau_rows = tau if tau_kind == "float" else tau[:, None].expand(batch, hints).reshape(-1)
    noise = ko.noise_embedding(u.reshape(-1), tau_rows, weight, bias).view(batch, hints, hidden)
    exact = ref.noise_embedding(u.reshape(-1).double(), tau_rows.double() if tau_kind != "float" else tau,
                                weight.double(), bias.double()).view(batch, hints, hidden)
    assert_within_pytorch_error(got[:, contexts:], noise, exact, dtype, "noise rows")


@pytest.mark.parametrize("device", DEVICES)
def test_decode_shaped_assembly(device):
    """[committed | hints] rows of a decode step: k tokens and k hints per sequence."""
    ids = torch.randint(0, 100, (64, 4), device=device)
    table = torch.randn(100, 32, device=device)
    weight, bias = weights(32, 8, torch.float32, device)
    u = torch.rand(64, 4, device=device)
    got = ko.noise_conditioned_embedding(ids, table, u, 1.0, weight, bias)
    want = ref.noise_conditioned_embedding(ids, table, u, 1.0, weight, bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Codes: u's features as dyadic sinusoids or binary digits

CODES = ["sinusoid", "dyadic", "binary"]


def coded_uniforms(rows, device, dtype):
    """Random uniforms plus the awkward ones: both ends, dyadic rationals, the largest value below 1."""
    u = torch.rand(rows, device=device, dtype=dtype)
    special = torch.tensor([0.0, 1.0, 0.5, 0.75, 0.375, 1 - torch.finfo(dtype).eps / 2], dtype=dtype)
    u[:min(rows, len(special))] = special[:rows].to(device)
    return u


def code_cases():
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for dtype in DTYPES[device] + ([torch.float64] if device == "cpu" else []):
            for code in ("dyadic", "binary"):
                yield pytest.param(device, dtype, code, marks=marks, id=f"{device}-{str(dtype)[6:]}-{code}")


@pytest.mark.parametrize("device,dtype,code", list(code_cases()))
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,freqs,hidden", [(0, 8, 16), (1, 19, 37), (37, 16, 48), (111, 19, 37)])
@pytest.mark.parametrize("per_row_tau", [False, True])
def test_codes_match_float64(device, dtype, code, u_dtype, rows, freqs, hidden, per_row_tau):
    u = coded_uniforms(rows, device, u_dtype)
    tau = torch.rand(rows, device=device) * 2 + 0.01 if per_row_tau else 0.8
    weight, bias = weights(hidden, freqs, dtype, device)
    with expect_kernel("noise_embedding"):
        got = ko.noise_embedding(u, tau, weight, bias, code=code)
    assert got.shape == (rows, hidden) and got.dtype == dtype
    check_against_float64(got, u, tau, weight, bias, dtype, code)


def feature_probe(u, freqs, code, dtype=torch.float64):
    """The kernel's features themselves: an identity weight maps them to the output unchanged."""
    eye = torch.eye(4 * freqs, dtype=dtype, device=u.device)
    with expect_kernel("noise_embedding"):
        return ko.noise_embedding(u, 0.5, eye, code=code)


@pytest.mark.parametrize("device", DEVICES)
def test_binary_digits_are_exact_in_either_precision(device):
    """Digits read from the input value: the same as float64 floor(u 2^k) mod 2, for fp32 and fp64 u alike."""
    weight_dtype = torch.float64 if device == "cpu" else torch.float32
    freqs = 24  # 48 digits
    below_half = 0.5 - 2.0 ** -40  # fp64 only: rounds to 0.5 in fp32, which flips all of its first 40 digits
    u64 = torch.tensor([0.0, 1.0, 0.5, 0.75, below_half, 2.0 ** -30, 1 - 2.0 ** -48], dtype=torch.float64,
                       device=device)
    for u in (u64, coded_uniforms(200, device, torch.float32), coded_uniforms(200, device, torch.float64)):
        got = feature_probe(u, freqs, "binary", weight_dtype)[:, :2 * freqs].double()
        want = ref.noise_features(u, 0.5, freqs, "binary")[:, :2 * freqs]
        assert torch.equal(got, want)
        scaled = torch.stack([torch.floor(u.double().cpu() * 2.0 ** k) % 2 for k in range(1, 2 * freqs + 1)], 1)
        by_formula = torch.where(u.cpu()[:, None] == 1, 1.0, scaled) * 2 - 1
        assert torch.equal(got.cpu(), by_formula)
    got = feature_probe(u64, freqs, "binary", weight_dtype)[:, :2 * freqs].cpu()
    assert (got[0] == -1).all() and (got[1] == 1).all()  # u = 0: all digits 0; u = 1: 0.111..._2
    assert got[4, 0] == -1 and (got[4, 1:40] == 1).all() and (got[4, 40:] == -1).all()
    assert got[5, 29] == 1 and (got[5, :29] == -1).all()
    got32 = feature_probe(u64.float(), freqs, "binary", weight_dtype)[4, :2 * freqs].cpu()
    assert got32[0] == 1 and (got32[1:] == -1).all()  # the fp32 value is 0.5 exactly


@pytest.mark.parametrize("device", DEVICES)
def test_dyadic_features_stay_accurate_at_high_frequencies(device):
    """frac(2^j u) is exact, so feature j = 59 is as accurate as feature 0; u = 1 encodes as u = 0."""
    freqs = 60
    u = coded_uniforms(300, device, torch.float64)
    want = ref.noise_features(u, 0.5, freqs, "dyadic")
    if device == "cpu":
        got = feature_probe(u, freqs, "dyadic")
        assert (got - want).abs().max() <= 1e-14
    got = feature_probe(u, freqs, "dyadic", torch.float32).double()
    assert (got - want).abs().max() <= 1e-6
    assert torch.equal(got[0, :2 * freqs], got[1, :2 * freqs])


def test_binary_is_piecewise_constant_in_u():
    """The derivative in u is zero almost everywhere: a step far below the last digit changes nothing."""
    u = torch.rand(64, dtype=torch.float64) * 0.99
    weight, bias = weights(16, 4, torch.float64, "cpu")
    step = 2.0 ** -40  # far below digit 2F = 8, and far above u's last bit
    inside = (torch.floor(u * 2 ** 8) == torch.floor((u + step) * 2 ** 8))
    same = ko.noise_embedding(u + step, 0.4, weight, bias, code="binary") == ko.noise_embedding(
        u, 0.4, weight, bias, code="binary")
    assert same[inside].all() and inside.sum() > 50


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code", ["dyadic", "binary"])
@pytest.mark.parametrize("tau_kind", ["float", "per_sequence"])
def test_noise_conditioned_codes(device, code, tau_kind):
    batch, contexts, hints, vocab, hidden, freqs = 3, 5, 19, 40, 37, 19
    ids = torch.randint(0, vocab, (batch, contexts), device=device)
    table = torch.randn(vocab, hidden, device=device) * 0.1
    u = torch.rand(batch, hints, device=device, dtype=torch.float64)
    u[0, :2] = torch.tensor([0.0, 1.0])
    tau = 0.9 if tau_kind == "float" else torch.rand(batch, device=device) + 0.1
    weight, bias = weights(hidden, freqs, torch.float32, device)
    with expect_kernel("noise_conditioned_embedding"):
        got = ko.noise_conditioned_embedding(ids, table, u, tau, weight, bias, code=code)
    want = ref.noise_conditioned_embedding(ids, table.double(), u, tau if tau_kind == "float" else tau.double(),
                                           weight.double(), bias.double(), code)
    assert torch.equal(got[:, :contexts], table[ids])
    assert (got.double() - want).abs().max() <= EMBEDDING_FP32_RTOL * want.abs().max()


@pytest.mark.parametrize("code", CODES)
def test_gradcheck_float64_codes(code):
    """Weight and bias (the tau columns included) for every code. u gets no gradient: it is noise (and under
    "binary" its derivative is zero almost everywhere)."""
    u = coded_uniforms(9, "cpu", torch.float64)
    ids = torch.randint(0, 11, (2, 3))
    uu = torch.rand(2, 4, dtype=torch.float64)
    table = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    for tau in (0.4, torch.rand(9, dtype=torch.float64) + 0.1):
        weight = torch.randn(6, 4 * 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
        with expect_kernel("noise_embedding_backward"):
            assert torch.autograd.gradcheck(lambda w, b: ko.noise_embedding(u, tau, w, b, code=code), (weight, bias))
        seq_tau = tau if isinstance(tau, float) else tau[:2]
        with expect_kernel("noise_conditioned_embedding_backward"):
            assert torch.autograd.gradcheck(
                lambda t, w, b: ko.noise_conditioned_embedding(ids, t, uu, seq_tau, w, b, code=code),
                (table, weight, bias))
    with pytest.raises(ValueError, match="`u` requires grad"):
        ko.noise_embedding(u.clone().requires_grad_(), 0.4, weight, bias, code=code)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code", ["dyadic", "binary"])
def test_opcheck_and_compile_codes(device, code):
    u, ids = torch.rand(10, device=device), torch.randint(0, 9, (2, 3), device=device)
    weight, bias = weights(16, 4, torch.float32, device)
    table = torch.randn(9, 16, device=device)
    uu = torch.rand(2, 5, device=device, dtype=torch.float64)
    torch.library.opcheck(torch.ops.kforcing.noise_embedding.default, (u, None, 0.3, weight, bias, code))
    torch.library.opcheck(torch.ops.kforcing.noise_embedding.default,
                          (u, torch.rand(10, device=device), 0.0, weight.requires_grad_(), None, code))
    torch.library.opcheck(torch.ops.kforcing.noise_conditioned_embedding.default,
                          (ids, table.requires_grad_(), uu, torch.rand(2, device=device), 0.0, weight, bias, code))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def embed(u, uu, weight, bias, table):
        return ko.noise_embedding(u, 0.7, weight, bias, code=code).sum() + ko.noise_conditioned_embedding(
            ids, table, uu, 0.7, weight, bias, code=code).sum()

    with expect_kernel("noise_embedding", "noise_conditioned_embedding"):
        got = embed(u, uu, weight, bias, table)
        got.backward()
    want = ko.noise_embedding(u, 0.7, weight, bias, code=code).sum() + ko.noise_conditioned_embedding(
        ids, table, uu, 0.7, weight, bias, code=code).sum()
    torch.testing.assert_close(got, want)


def test_unknown_code_is_a_clear_error():
    u, (weight, bias) = torch.rand(5), weights(8, 4, torch.float32, "cpu")
    ids, table, uu = torch.randint(0, 9, (2, 3)), torch.randn(9, 8), torch.rand(2, 4)
    message = "`code` must be one of 'sinusoid', 'dyadic', 'binary', got 'gray'"
    calls = [
        lambda: ko.noise_embedding(u, 0.3, weight, bias, code="gray"),
        lambda: ref.noise_embedding(u, 0.3, weight, bias, code="gray"),
        lambda: torch.ops.kforcing.noise_embedding(u, None, 0.3, weight, bias, "gray"),
        lambda: torch.ops.kforcing.noise_embedding_backward(torch.randn(5, 8), u, None, 0.3, 4, True, "gray"),
        lambda: ko.noise_conditioned_embedding(ids, table, uu, 0.3, weight, bias, code="gray"),
        lambda: ref.noise_conditioned_embedding(ids, table, uu, 0.3, weight, bias, code="gray"),
        lambda: torch.ops.kforcing.noise_conditioned_embedding(ids, table, uu, None, 0.3, weight, bias, "gray"),
        lambda: NoiseEmbedding(8, num_freqs=2, code="gray"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fu, fw, fb = (mode.from_tensor(t) for t in (u, weight, bias))
        with pytest.raises(ValueError, match=message):
            torch.ops.kforcing.noise_embedding(fu, None, 0.3, fw, fb, "gray")


# --------------------------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_float64_noise_embedding():
    u = uniforms(9, "cpu", torch.float64)
    for tau in (0.4, torch.rand(9, dtype=torch.float64)):
        weight = torch.randn(6, 4 * 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda w, b: ko.noise_embedding(u, tau, w, b), (weight, bias))


def test_gradcheck_float64_noise_conditioned():
    ids = torch.randint(0, 11, (2, 3))
    u = torch.rand(2, 4, dtype=torch.float64)
    table = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    for tau in (0.4, torch.rand(2, dtype=torch.float64)):
        weight = torch.randn(6, 4 * 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda t, w, b: ko.noise_conditioned_embedding(ids, t, u, tau, w, b), (table, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("code", CODES)
def test_gradients_match_reference(device, dtype, code):
    ids = torch.randint(0, 30, (4, 6), device=device)
    u = torch.rand(4, 20, device=device)
    tau = torch.rand(4, device=device)
    leaves = [(torch.randn(30, 48, device=device) * 0.1).to(dtype), *weights(48, 16, dtype, device)]
    grad = torch.randn(4, 26, 48, device=device).to(dtype)

    def grads(fn, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        return torch.autograd.grad(fn(ids, tensors[0], u, tau, *tensors[1:], code=code), tensors,
                                   grad.to(tensors[0].dtype))

    with expect_kernel("noise_conditioned_embedding_backward"):
        got = grads(ko.noise_conditioned_embedding, leaves)
    exact = grads(ref.noise_conditioned_embedding, [t.double() for t in leaves])
    plain = grads(ref.noise_conditioned_embedding, leaves)
    for name, g, p, e in zip(("token_table", "weight", "bias"), got, plain, exact):
        assert g.dtype == dtype
        if dtype == torch.float32:
            assert (g.double() - e).abs().max() <= 1e-4 * e.abs().max(), name
        else:
            assert_within_pytorch_error(g, p, e, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    u, ids = torch.rand(10, device=device), torch.randint(0, 9, (2, 3), device=device)
    weight, bias = weights(16, 4, torch.float32, device)
    table = torch.randn(9, 16, device=device)
    uu = torch.rand(2, 5, device=device)
    torch.library.opcheck(torch.ops.kforcing.noise_embedding.default, (u, None, 0.3, weight, bias))
    torch.library.opcheck(torch.ops.kforcing.noise_embedding.default, (u, torch.rand(10, device=device), 0.0,
                                                                       weight.requires_grad_(), None))
    torch.library.opcheck(torch.ops.kforcing.noise_conditioned_embedding.default,
                          (ids, table.requires_grad_(), uu, torch.rand(2, device=device), 0.0, weight, bias))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def embed(u, uu, weight, bias, table):
        return ko.noise_embedding(u, 0.7, weight, bias).sum() + ko.noise_conditioned_embedding(
            ids, table, uu, 0.7, weight, bias).sum()

    got = embed(u, uu, weight, bias, table)
    got.backward()
    want = ko.noise_embedding(u, 0.7, weight, bias).sum() + ko.noise_conditioned_embedding(
        ids, table, uu, 0.7, weight, bias).sum()
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------------------
# Bad input


def test_errors_name_the_argument():
    u, weight, bias = torch.rand(5), *weights(8, 4, torch.float32, "cpu")
    ids, table, uu = torch.randint(0, 9, (2, 3)), torch.randn(9, 8), torch.rand(2, 4)
    cases = [
        (lambda: ko.noise_embedding(u + 1.5, 0.3, weight, bias), ValueError, "`u` must lie in \\[0, 1\\]"),
        (lambda: ko.noise_embedding(u * math.nan, 0.3, weight, bias), ValueError, "`u` must lie in \\[0, 1\\]"),
        (lambda: ko.noise_embedding(u[None], 0.3, weight, bias), ValueError, "`u` must be 1-D"),
        (lambda: ko.noise_embedding(u, torch.rand(4), weight, bias), ValueError, "`tau` must have size 5"),
        (lambda: ko.noise_embedding(u, 0.3, weight[:, :-1], bias), ValueError, "`weight` must be \\(H, 4F\\)"),
        (lambda: ko.noise_embedding(u, 0.3, weight, bias[:-1]), ValueError, "`bias` must have size 8"),
        (lambda: ko.noise_embedding(u, 0.3, weight, bias.double()), TypeError, "`bias` has dtype"),
        (lambda: ko.noise_embedding(u.half(), 0.3, weight, bias), TypeError, "`u` must have dtype"),
        (lambda: ko.noise_embedding(u.requires_grad_(), 0.3, weight, bias), ValueError, "`u` requires grad"),
        (lambda: ko.noise_conditioned_embedding(ids + 20, table, uu, 0.3, weight, bias), ValueError,
         "`token_ids` must lie in \\[0, V=9\\)"),
        (lambda: ko.noise_conditioned_embedding(ids - 5, table, uu, 0.3, weight, bias), ValueError,
         "`token_ids` must lie in \\[0, V=9\\)"),
        (lambda: ko.noise_conditioned_embedding(ids.float(), table, uu, 0.3, weight, bias), TypeError,
         "`token_ids` must have dtype"),
        (lambda: ko.noise_conditioned_embedding(ids, table, uu[:1], 0.3, weight, bias), ValueError,
         "`u` must have size 2"),
        (lambda: ko.noise_conditioned_embedding(ids, table[:, :4], uu, 0.3, weight, bias), ValueError,
         "`weight` must have size 4"),
        (lambda: ko.noise_conditioned_embedding(ids, table.double(), uu, 0.3, weight, bias), TypeError,
         "`weight` has dtype"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


BAD_TAUS = [math.nan, math.inf, -math.inf, 0.0, -0.5]


@pytest.mark.parametrize("bad", BAD_TAUS)
def test_cpu_every_tau_must_be_positive_and_finite(bad):
    """A scalar tau and every value of a per-row / per-sequence tau: the kernels and the references raise alike."""
    u, (weight, bias) = torch.rand(5), weights(8, 4, torch.float32, "cpu")
    ids, table, uu = torch.randint(0, 9, (2, 3)), torch.randn(9, 8), torch.rand(2, 4)
    per_row = torch.rand(5) + 0.1
    per_row[3] = bad
    per_seq = torch.tensor([0.7, bad])
    calls = {
        "noise_embedding": [lambda fn: fn(u, bad, weight, bias), lambda fn: fn(u, per_row, weight, bias)],
        "noise_conditioned_embedding": [lambda fn: fn(ids, table, uu, bad, weight, bias),
                                        lambda fn: fn(ids, table, uu, per_seq, weight, bias)],
    }
    for op, cases in calls.items():
        for case in cases:
            for fn in (getattr(ko, op), getattr(ref, op)):
                with pytest.raises(ValueError, match=f"kforcing.{op}: `tau` must be positive and finite"):
                    case(fn)
    with pytest.raises(ValueError, match="kforcing.noise_embedding: `tau` must be positive and finite"):
        ko.noise_embedding(u, torch.tensor(bad), weight, bias)  # a 0-d tensor: every row
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fu, fw, fb = (mode.from_tensor(t) for t in (u, weight, bias))
        with pytest.raises(ValueError, match="kforcing.noise_embedding: `tau` must be positive and finite"):
            torch.ops.kforcing.noise_embedding(fu, None, bad, fw, fb)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_invalid_per_row_tau_gives_nan_rows(dtype):
    """No host sync on CUDA: a per-row (or per-sequence) tau that is not positive and finite makes exactly the
    rows it conditions NaN; a scalar tau is checked on the host and raises."""
    u = torch.rand(len(BAD_TAUS) + 2, device="cuda")
    weight, bias = weights(16, 4, dtype, "cuda")
    tau = torch.tensor(BAD_TAUS + [0.5, 2.0], device="cuda")
    out = ko.noise_embedding(u, tau, weight, bias)
    assert torch.isnan(out[:len(BAD_TAUS)]).all() and not torch.isnan(out[len(BAD_TAUS):]).any()
    ids, table = torch.randint(0, 9, (2, 3), device="cuda"), torch.randn(9, 16, device="cuda", dtype=dtype)
    seq = ko.noise_conditioned_embedding(ids, table, torch.rand(2, 4, device="cuda"),
                                         torch.tensor([math.nan, 0.7], device="cuda"), weight, bias)
    assert torch.isnan(seq[0, 3:]).all() and not torch.isnan(seq[0, :3]).any() and not torch.isnan(seq[1]).any()
    with pytest.raises(ValueError, match="`tau` must be positive and finite"):
        ko.noise_embedding(u, math.nan, weight, bias)


@pytest.mark.cuda
def test_cuda_bad_ids_and_uniforms_give_nan_rows():
    ids = torch.tensor([[1, 99, 2]], device="cuda")
    table = torch.randn(9, 16, device="cuda")
    weight, bias = weights(16, 4, torch.bfloat16, "cuda")
    u = torch.tensor([[0.5, 1.5]], device="cuda")
    out = ko.noise_conditioned_embedding(ids, table.bfloat16(), u, 0.3, weight, bias)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[0, 4]).all()
    assert not torch.isnan(out[0, [0, 2, 3]]).any()


# --------------------------------------------------------------------------------------------------------
# The drop-in module


def test_noise_embedding_module_starts_as_its_linear_part():
    module = NoiseEmbedding(32, num_freqs=8)
    u = torch.rand(3, 5)
    x = ko.noise_embedding(u.reshape(-1), 0.6, module.weight, module.bias).view(3, 5, 32)
    torch.testing.assert_close(module(u, 0.6), x)  # the residual MLP's output layer is zero at init
    assert module.weight.std().item() == pytest.approx(0.02, rel=0.2)
    seq = module.embed_sequence(torch.randint(0, 10, (3, 2)), torch.randn(10, 32), u, torch.full((3,), 0.6))
    torch.testing.assert_close(seq[:, 2:], x)


@pytest.mark.parametrize("code", ["dyadic", "binary"])
def test_noise_embedding_module_code(code):
    module = NoiseEmbedding(32, num_freqs=8, code=code)
    u = torch.rand(3, 5)
    x = ko.noise_embedding(u.reshape(-1), 0.6, module.weight, module.bias, code=code).view(3, 5, 32)
    torch.testing.assert_close(module(u, 0.6), x)
    seq = module.embed_sequence(torch.randint(0, 10, (3, 2)), torch.randn(10, 32), u, 0.6)
    torch.testing.assert_close(seq[:, 2:], x)
    assert f"code='{code}'" in repr(module)
