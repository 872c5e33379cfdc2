"""inverse_cdf_sample: the kernels against a float64 reference, its edge cases, errors and registration."""

import math

import pytest
import torch
from conftest import DEVICES, expect_kernel
from tolerances import SAMPLER_BOUNDARY_TOLERANCE, SAMPLER_FLOAT64_BOUNDARY_TOLERANCE

import kforcing_ops as ko
from kforcing_ops import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Measured disagreements with the float64 reference are far rarer than these tolerances allow.
BOUNDARY_TOLERANCE = SAMPLER_BOUNDARY_TOLERANCE


def walk_order(logits, order):
    """Positions of the CDF -> token ids: vocabulary order, or descending logit (equal logits by smaller id)."""
    x = logits.double()
    if order == "descending":
        return torch.sort(torch.where(torch.isnan(x), -math.inf, x), dim=1, descending=True, stable=True).indices
    return torch.arange(x.shape[1], device=x.device).expand(x.shape)


def float64_cdf(logits, temperature, top_k, top_p, order="vocab"):
    """The float64 CDF of the rule (over the restricted, renormalised support) in the walk order, one row per
    input row."""
    x = logits.double()
    t = temperature.double() if isinstance(temperature, torch.Tensor) else torch.full((x.shape[0],), temperature,
                                                                                       dtype=torch.float64)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    inv_t = (1.0 / t.to(x.device)).clamp(max=torch.finfo(compute).max)
    shifted = (x - x.amax(dim=1, keepdim=True)).clamp(min=torch.finfo(compute).min)
    z = torch.where(x > -math.inf, shifted * inv_t[:, None], -math.inf)
    if 0 < top_k < z.shape[1]:
        z = z.masked_fill(x < x.topk(top_k, dim=1).values[:, -1:], -math.inf)
    if top_p < 1:
        z = z.masked_fill(~ref._nucleus(z, top_p, rank=torch.where(z > -math.inf, x, -math.inf)), -math.inf)
    return torch.softmax(z, dim=1).gather(1, walk_order(logits, order)).cumsum(dim=1)


def assert_agrees(got, logits, u, temperature=1.0, top_k=0, top_p=1.0, order="vocab"):
    """Exact agreement with the float64 reference, except for u within BOUNDARY_TOLERANCE of a boundary."""
    want = ref.inverse_cdf_sample(logits.cpu(), u.cpu(), temperature if not isinstance(temperature, torch.Tensor)
                                  else temperature.cpu(), top_k, top_p, order)
    got = got.cpu()
    differ = (got != want).nonzero().flatten()
    if differ.numel():
        rows = logits[differ].cpu()
        cdf = float64_cdf(rows, temperature[differ].cpu() if isinstance(temperature, torch.Tensor)
                          else temperature, top_k, top_p, order)
        position = walk_order(rows, order).argsort(dim=1)  # token id -> its position in the walk
        lo = torch.minimum(position.gather(1, got[differ, None]), position.gather(1, want[differ, None])).squeeze(1)
        boundary = cdf.gather(1, lo[:, None]).squeeze(1)  # the CDF value between the two answers
        distance = (u[differ].cpu().double() - boundary).abs()
        assert (distance <= BOUNDARY_TOLERANCE).all(), (
            f"{differ.numel()} rows disagree with the float64 reference, some far from a boundary: "
            f"rows {differ[:5].tolist()}, distances {distance[:5].tolist()}")
    return differ.numel()


def random_logits(rows, vocab, dtype, device, scale=3.0):
    return (torch.randn(rows, vocab, device=device) * scale).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 50257, 262144])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_matches_float64_reference(device, dtype, vocab, rows):
    logits = random_logits(rows, vocab, dtype, device)
    u = torch.rand(rows, dtype=torch.float64, device=device)
    with expect_kernel("inverse_cdf_sample"):
        got = ko.inverse_cdf_sample(logits, u)
    assert got.shape == (rows,) and got.dtype == torch.int64 and got.device.type == device
    assert_agrees(got, logits, u)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.float64])
def test_thousands_of_rows_agree(device, u_dtype):
    """8,000 rows of mixed scales (peaked to flat): the measured disagreement rate is printed and bounded."""
    rows, vocab = 8000, 1000
    scale = torch.logspace(-1, 1.5, rows, device=device)[:, None]
    logits = torch.randn(rows, vocab, device=device) * scale
    u = torch.rand(rows, dtype=u_dtype, device=device)
    disagreements = assert_agrees(ko.inverse_cdf_sample(logits, u), logits, u.double())
    print(f"\n{disagreements} of {rows} rows differ from float64 (all within {BOUNDARY_TOLERANCE} of a boundary)")
    assert disagreements <= rows * 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (50, 1.0), (0, 0.5), (0, 0.9), (40, 0.8), (7, 0.3)])
def test_top_k_top_p(device, dtype, top_k, top_p):
    logits = random_logits(300, 3001, dtype, device)
    u = torch.rand(300, dtype=torch.float64, device=device)
    with expect_kernel("inverse_cdf_sample"):
        got = ko.inverse_cdf_sample(logits, u, 0.8, top_k, top_p)
    assert_agrees(got, logits, u, 0.8, top_k, top_p)
    if top_k:  # never outside the top-k (ties at the k-th value allowed)
        kth = logits.float().topk(top_k, dim=1).values[:, -1]
        assert (logits.float().gather(1, got[:, None]).squeeze(1) >= kth).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ties_at_the_threshold_are_kept(device):
    # Logits with many exact ties: top-k keeps every logit equal to the k-th, top-p whole tie groups.
    logits = torch.randint(-3, 3, (500, 64), device=device).float()
    u = torch.rand(500, dtype=torch.float64, device=device)
    for top_k, top_p in [(3, 1.0), (10, 1.0), (0, 0.5), (5, 0.7)]:
        assert_agrees(ko.inverse_cdf_sample(logits, u, 1.0, top_k, top_p), logits, u, 1.0, top_k, top_p)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_temperature(device):
    logits = random_logits(64, 5000, torch.float32, device)
    u = torch.rand(64, device=device)
    temperature = torch.rand(64, dtype=torch.float64, device=device) * 2 + 0.05
    got = ko.inverse_cdf_sample(logits, u, temperature)
    assert_agrees(got, logits, u.double(), temperature)
    # a tensor of equal temperatures gives what the float gives
    same = ko.inverse_cdf_sample(logits, u, torch.full((64,), 0.7, device=device))
    assert torch.equal(same, ko.inverse_cdf_sample(logits, u, 0.7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_logits(device, dtype):
    base = random_logits(2000, 40, dtype, device)
    u = torch.rand(40, dtype=torch.float64, device=device)
    for logits in (base.t(), base.t()[:, ::3], random_logits(80, 3000, dtype, device)[::2, 5:2005]):
        rows = logits.shape[0]
        got = ko.inverse_cdf_sample(logits, u[:rows])
        assert torch.equal(got, ko.inverse_cdf_sample(logits.contiguous(), u[:rows]))
        assert_agrees(got, logits, u[:rows])


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device):
    inf = math.inf
    logits = torch.tensor([[-inf, -inf, 1.0, 2.0, -inf],
                           [-inf, -inf, 1.0, 2.0, -inf],
                           [0.0, 0.0, 0.0, 0.0, 0.0],
                           [5.0, -inf, -inf, -inf, -inf],
                           [-inf, -inf, -inf, -inf, 3.0]], device=device)
    u = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0], dtype=torch.float64, device=device)
    got = ko.inverse_cdf_sample(logits, u).tolist()
    assert got == [2, 3, 4, 0, 4]  # u=0: first nonzero; u=1: last nonzero; single-token rows
    # u = 0 with top-k still lands on the first token of the support
    assert ko.inverse_cdf_sample(logits[2:3] + torch.arange(5.0, device=device), u[4:5], 1.0, 2).item() == 3
    # huge logits and tiny temperatures do not overflow
    big = torch.tensor([[1e30, 1e30 - 1e24, -1e30]], device=device)
    assert ko.inverse_cdf_sample(big, torch.tensor([0.3], device=device)).item() == 0
    assert ko.inverse_cdf_sample(logits[2:3] + torch.arange(5.0, device=device), torch.tensor([0.99], device=device),
                                 1e-30).item() == 4


# --------------------------------------------------------------------------------------------------------
# Extreme temperatures, u = 0, float64 logits

FLOAT32_MAX = torch.finfo(torch.float32).max
# Tiny (1 / T overflows fp32, and even fp64), ordinary, and huge (1 / T underflows fp32, or fp64).
EXTREME_TEMPERATURES = [1e-320, 1e-300, 1e-45, 1e-39, 1e-3, 1.0, 1e30, 1e39, 1e300, 1.7e308]


def logits_with_dead_tokens(rows, vocab, dtype, device, dead_fraction=0.3, scale=3.0):
    logits = random_logits(rows, vocab, dtype, device, scale)
    dead = torch.rand(rows, vocab, device=device) < dead_fraction
    dead[:, vocab // 3] = False  # one live token per row
    return logits.masked_fill(dead, -math.inf), dead


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.5), (7, 1.0), (40, 0.8)])
def test_extreme_temperatures_follow_the_rule(device, per_row, top_k, top_p):
    """Huge and tiny temperatures, with -inf logits, over a vocabulary of several chunks with a partial last one:
    the reference's answer (1/T clamped to fp32), never a negative id, never a -inf token, and at huge T every
    finite token reachable (the last partial chunk included)."""
    rows, vocab = 24, 50257
    logits, dead = logits_with_dead_tokens(rows, vocab, torch.float32, device)
    u = torch.rand(rows, dtype=torch.float64, device=device)
    u[:4] = torch.tensor([0.0, 1.0, 1 - 1e-9, 1e-12], dtype=torch.float64)
    for temperature in EXTREME_TEMPERATURES:
        t = torch.full((rows,), temperature, dtype=torch.float64, device=device) if per_row else temperature
        with expect_kernel("inverse_cdf_sample"):
            got = ko.inverse_cdf_sample(logits, u, t, top_k, top_p)
        assert ((got >= 0) & (got < vocab)).all(), f"T={temperature}: {got.tolist()}"
        assert not dead.gather(1, got[:, None]).any(), f"T={temperature}: a -inf token was drawn"
        assert_agrees(got, logits, u, t, top_k, top_p)
    # At a huge temperature every finite token is equally likely: u near 1 lands in the last partial chunk.
    if top_k == 0 and top_p == 1.0:
        got = ko.inverse_cdf_sample(logits, torch.full((rows,), 1 - 1e-6, dtype=torch.float64, device=device), 1e300)
        assert (got >= vocab - 1105).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_per_row_temperatures(device):
    logits, _ = logits_with_dead_tokens(len(EXTREME_TEMPERATURES), 9000, torch.float32, device)
    u = torch.rand(len(EXTREME_TEMPERATURES), dtype=torch.float64, device=device)
    t = torch.tensor(EXTREME_TEMPERATURES, dtype=torch.float64, device=device)
    assert_agrees(ko.inverse_cdf_sample(logits, u, t), logits, u, t)


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_with_dead_tokens_keeps_the_nucleus(device):
    """-inf logits weigh nothing in the nucleus: top-p keeps the most likely tokens, not the last finite one."""
    logits = torch.tensor([[0.0, -math.inf, 5.0, -math.inf, 1.0, -math.inf]] * 3, device=device)
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, device=device)
    for temperature in (1.0, 1e300):
        got = ko.inverse_cdf_sample(logits, u, temperature, 0, 0.5)
        assert got.tolist() == ([2, 2, 2] if temperature == 1.0 else [2, 2, 4]), temperature  # {2, 4} at huge T
        assert_agrees(got, logits, u, temperature, 0, 0.5)


def test_u_zero_is_the_first_support_token_fuzz():
    """u = 0 (and u = 1) agree with the reference exactly on rows built to stress the chunk walk: -inf runs,
    chunk maxima far below the row max (their rescaled mass underflows to 0 in fp64), ties and tiny spreads."""
    gen = torch.Generator().manual_seed(1234)
    for trial in range(60):
        vocab = int(torch.randint(1, 3 * 2048 + 100, (1,), generator=gen))
        rows = 4
        logits = torch.randn(rows, vocab, generator=gen) * float(torch.tensor(10.0) ** torch.randint(-3, 4, (1,),
                                                                                                       generator=gen))
        kind = trial % 4
        if kind == 0:  # the first chunk far below the rest (2047 vs 2048 of the old walk)
            logits[:, :2048] -= 2000.0
        elif kind == 1:  # long -inf runs
            logits[torch.rand(rows, vocab, generator=gen) < 0.9] = -math.inf
        elif kind == 2:  # ties
            logits = logits.round()
        else:  # a single finite token per row, anywhere
            keep = torch.randint(0, vocab, (rows,), generator=gen)
            logits = torch.full_like(logits, -math.inf).scatter(1, keep[:, None], 1.0)
        logits[:, int(torch.randint(0, vocab, (1,), generator=gen))] = 0.0  # a finite logit in every row
        for dtype in DTYPES + [torch.float64]:
            x = logits.to(dtype)
            for u_value in (0.0, 1.0):
                u = torch.full((rows,), u_value, dtype=torch.float64)
                for temperature in (1.0, 1e-3, 1e300):
                    want = ref.inverse_cdf_sample(x, u, temperature)
                    got = ko.inverse_cdf_sample(x, u, temperature)
                    assert torch.equal(got, want), (trial, dtype, u_value, temperature, got.tolist(), want.tolist())


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (50, 1.0), (0, 0.9), (20, 0.7)])
def test_float64_logits_on_cpu(top_k, top_p):
    """float64 logits are sampled in float64 (exponentials and sums): the exact CDF the distillation needs."""
    logits = torch.randn(300, 5000, dtype=torch.float64) * 3
    logits[:, ::7] = -math.inf
    u = torch.rand(300, dtype=torch.float64)
    with expect_kernel("inverse_cdf_sample"):
        got = ko.inverse_cdf_sample(logits, u, 0.9, top_k, top_p)
    want = ref.inverse_cdf_sample(logits, u, 0.9, top_k, top_p)
    differ = (got != want).nonzero().flatten()
    if differ.numel():  # only where u lies on a float64 CDF boundary
        cdf = float64_cdf(logits[differ], 0.9, top_k, top_p)
        boundary = cdf.gather(1, torch.minimum(got[differ], want[differ])[:, None]).squeeze(1)
        assert ((u[differ] - boundary).abs() <= SAMPLER_FLOAT64_BOUNDARY_TOLERANCE).all()
    # A float64 CDF resolves a boundary that float32 cannot: u a hair either side of p_0.
    row = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p = (1/4, 3/4)
    below, above = torch.tensor([0.25 - 1e-12], dtype=torch.float64), torch.tensor([0.25 + 1e-12], dtype=torch.float64)
    assert ko.inverse_cdf_sample(row, below).item() == 0 and ko.inverse_cdf_sample(row, above).item() == 1


@pytest.mark.cuda
def test_cuda_float64_logits_are_a_clear_error():
    logits, u = torch.randn(2, 10, device="cuda", dtype=torch.float64), torch.rand(2, device="cuda")
    with pytest.raises(TypeError, match="kforcing.inverse_cdf_sample: `logits` of dtype float64 are sampled on CPU"):
        ko.inverse_cdf_sample(logits, u)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_probability_tokens_are_never_returned(device):
    logits = torch.randn(2000, 97, device=device)
    dead = torch.rand(2000, 97, device=device) < 0.6
    dead[:, 0] = False
    logits = logits.masked_fill(dead, -math.inf)
    for u in (torch.rand(2000, device=device), torch.zeros(2000, device=device), torch.ones(2000, device=device)):
        got = ko.inverse_cdf_sample(logits, u)
        assert not dead.gather(1, got[:, None]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_monotone_in_u_and_deterministic(device):
    logits = random_logits(1, 50257, torch.float32, device).expand(4096, -1)
    u = torch.linspace(0, 1, 4096, dtype=torch.float64, device=device)
    got = ko.inverse_cdf_sample(logits, u)
    assert (got[1:] >= got[:-1]).all()
    assert torch.equal(got, ko.inverse_cdf_sample(logits, u))


def test_token_frequencies_match_p():
    """Chi-square: tokens drawn from 200k uniforms follow p (a fixed seed, so the test is not flaky)."""
    vocab, draws = 30, 200_000
    logits = torch.randn(1, vocab) * 1.5
    tokens = ko.inverse_cdf_sample(logits.expand(draws, -1), torch.rand(draws, dtype=torch.float64))
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = torch.softmax(logits.double(), dim=1)[0] * draws
    chi2 = ((counts - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc(torch.tensor((vocab - 1) / 2, dtype=torch.float64), chi2 / 2).item()
    assert p_value > 1e-3, f"chi-square {chi2.item():.1f} on {vocab - 1} dof, p = {p_value:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_frequencies_match_renormalised_nucleus(device):
    vocab, draws, top_p = 40, 100_000, 0.6
    logits = torch.randn(1, vocab, device=device) * 2
    tokens = ko.inverse_cdf_sample(logits.expand(draws, -1), torch.rand(draws, device=device), 1.0, 0, top_p)
    p = torch.softmax(logits.double().masked_fill(~ref._nucleus(logits.double(), top_p), -math.inf), dim=1)[0]
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert (counts[p == 0] == 0).all()
    live = p > 0
    chi2 = ((counts[live] - p[live] * draws) ** 2 / (p[live] * draws)).sum()
    dof = torch.tensor((int(live.sum()) - 1) / 2, dtype=torch.float64)
    assert torch.special.gammaincc(dof, chi2.cpu() / 2).item() > 1e-3


# --------------------------------------------------------------------------------------------------------
# Bad input


def test_cpu_errors_name_the_argument():
    logits, u = torch.randn(4, 10), torch.rand(4)
    cases = [
        (lambda: ko.inverse_cdf_sample(logits[0], u), ValueError, "`logits` must be 2-D"),
        (lambda: ko.inverse_cdf_sample(logits, u[:3]), ValueError, "`u` must have size 4"),
        (lambda: ko.inverse_cdf_sample(logits.int(), u), TypeError, "`logits` must have dtype"),
        (lambda: ko.inverse_cdf_sample(logits, u.half()), TypeError, "`u` must have dtype"),
        (lambda: ko.inverse_cdf_sample(logits, u, 0.0), ValueError, "`temperature` must be positive"),
        (lambda: ko.inverse_cdf_sample(logits, u, -torch.ones(4)), ValueError, "`temperature` must be positive"),
        (lambda: ko.inverse_cdf_sample(logits, u, torch.ones(3)), ValueError, "`temperature` must have size 4"),
        (lambda: ko.inverse_cdf_sample(logits, u, 1.0, -1), ValueError, "`top_k` must be >= 0"),
        (lambda: ko.inverse_cdf_sample(logits, u, 1.0, 0, 0.0), ValueError, "`top_p` must be in (0, 1]"),
        (lambda: ko.inverse_cdf_sample(logits, u + 1.5), ValueError, "`u` must lie in [0, 1]"),
        (lambda: ko.inverse_cdf_sample(logits, u * float("nan")), ValueError, "`u` must lie in [0, 1]"),
        (lambda: ko.inverse_cdf_sample(torch.zeros(4, 0), u), ValueError, "at least one vocabulary column"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            call()


@pytest.mark.parametrize("top_k", [0, 3])
def test_cpu_bad_rows_raise(top_k):
    logits, u = torch.randn(4, 10), torch.rand(4)
    nan_row = logits.clone()
    nan_row[2, 5] = math.nan
    with pytest.raises(ValueError, match="row 2 of `logits` contains NaN or \\+inf"):
        ko.inverse_cdf_sample(nan_row, u, 1.0, top_k)
    inf_row = logits.clone()
    inf_row[1, 0] = math.inf
    with pytest.raises(ValueError, match="row 1 of `logits` contains NaN or \\+inf"):
        ko.inverse_cdf_sample(inf_row, u, 1.0, top_k)
    dead_row = logits.clone()
    dead_row[3] = -math.inf
    with pytest.raises(ValueError, match="row 3 of `logits` has no finite logit"):
        ko.inverse_cdf_sample(dead_row, u, 1.0, top_k)


@pytest.mark.cuda
@pytest.mark.parametrize("top_k", [0, 3])
def test_cuda_bad_rows_return_minus_one(top_k):
    logits, u = torch.randn(5, 10, device="cuda"), torch.rand(5, device="cuda")
    logits[1, 3] = math.nan
    logits[2, 0] = math.inf
    logits[3] = -math.inf
    u[4] = 1.5
    got = ko.inverse_cdf_sample(logits, u, 1.0, top_k)
    assert got[1:].tolist() == [-1, -1, -1, -1] and got[0] >= 0
    with pytest.raises(ValueError, match="4 invalid row"):
        ko.raise_on_invalid_samples(got)
    ko.raise_on_invalid_samples(got[:1])


@pytest.mark.cuda
def test_cuda_mismatched_devices():
    with pytest.raises(ValueError, match="`u` is on cpu but `logits` is on cuda"):
        ko.inverse_cdf_sample(torch.randn(2, 5, device="cuda"), torch.rand(2))


# --------------------------------------------------------------------------------------------------------
# order="descending": the CDF walks the support by descending probability, equal logits by smaller id


def descending_cases():
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for dtype in DTYPES + ([torch.float64] if device == "cpu" else []):
            yield pytest.param(device, dtype, marks=marks, id=f"{device}-{str(dtype)[6:]}")


@pytest.mark.parametrize("device,dtype", list(descending_cases()))
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (40, 0.8)])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_descending_matches_float64_reference(device, dtype, top_k, top_p, temperature, ties):
    rows, vocab = 111, 1001
    logits = (torch.randint(-4, 4, (rows, vocab), device=device).to(dtype) if ties
              else random_logits(rows, vocab, dtype, device))
    u = torch.rand(rows, dtype=torch.float64, device=device)
    u[0], u[1], u[2], u[3] = 0.0, 1.0, 0.0, 1.0  # the ends of the CDF
    with expect_kernel("inverse_cdf_sample"):
        got = ko.inverse_cdf_sample(logits, u, temperature, top_k, top_p, order="descending")
    assert_agrees(got, logits, u, temperature, top_k, top_p, order="descending")
    support_logits = logits.double().gather(1, got[:, None]).squeeze(1)
    # u = 0: the largest logit (smallest id among its ties); u = 1: the smallest support logit, largest id.
    for r in (0, 2):
        assert support_logits[r] == logits[r].double().max()
        assert got[r] == (logits[r].double() == logits[r].double().max()).nonzero()[0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [1, 7, 19])
def test_descending_odd_vocab_and_u_ends(device, vocab):
    logits = random_logits(37, vocab, torch.float32, device)
    logits[:, vocab // 2] = logits[:, 0]  # a tie with token 0
    for u in (torch.zeros(37, device=device), torch.ones(37, device=device), torch.rand(37, device=device)):
        got = ko.inverse_cdf_sample(logits, u, order="descending")
        assert_agrees(got, logits, u.double(), order="descending")
    last = ko.inverse_cdf_sample(logits, torch.ones(37, device=device), order="descending")
    smallest = logits.min(dim=1, keepdim=True).values
    want_last = vocab - 1 - (logits == smallest).flip(1).int().argmax(dim=1)  # the largest id among the smallest
    assert torch.equal(last, want_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_descending_non_contiguous_logits(device, dtype):
    base = random_logits(2000, 40, dtype, device)
    u = torch.rand(40, dtype=torch.float64, device=device)
    for logits in (base.t(), base.t()[:, ::3], random_logits(80, 3000, dtype, device)[::2, 5:2005]):
        rows = logits.shape[0]
        for top_k, top_p in [(0, 1.0), (9, 0.9)]:
            got = ko.inverse_cdf_sample(logits, u[:rows], 1.0, top_k, top_p, order="descending")
            assert torch.equal(got, ko.inverse_cdf_sample(logits.contiguous(), u[:rows], 1.0, top_k, top_p,
                                                          order="descending"))
            assert_agrees(got, logits, u[:rows], 1.0, top_k, top_p, order="descending")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 1.0), (0, 0.8)])
def test_both_orders_sample_the_same_distribution(device, top_k, top_p):
    """Evenly spaced u over one row: each order draws every token n p_v times, give or take one."""
    n, vocab = 20000, 17
    row = torch.randn(vocab, device=device)
    row[3] = row[11]  # a tie
    logits = row.expand(n, vocab)
    u = (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n
    p = float64_cdf(logits[:1].cpu(), 1.0, top_k, top_p).diff(prepend=torch.zeros(1, 1, dtype=torch.float64))[0]
    for order in ("vocab", "descending"):
        counts = torch.bincount(ko.inverse_cdf_sample(logits, u, 1.0, top_k, top_p, order=order).cpu(),
                                minlength=vocab)
        assert ((counts.double() - n * p).abs() <= 1.0 + 1e-6).all(), order


@pytest.mark.parametrize("device", DEVICES)
def test_descending_on_equal_logits_is_the_vocab_order(device):
    logits = torch.full((50, 33), 0.25, device=device)
    u = torch.rand(50, device=device)
    assert torch.equal(ko.inverse_cdf_sample(logits, u, order="descending"), ko.inverse_cdf_sample(logits, u))


def test_descending_bad_rows_raise():
    logits, u = torch.randn(3, 10), torch.rand(3)
    logits[1, 4] = math.nan
    with pytest.raises(ValueError, match="row 1 of `logits` contains NaN or \\+inf"):
        ko.inverse_cdf_sample(logits, u, order="descending")
    with pytest.raises(ValueError, match="row 0 of `logits` has no finite logit"):
        ko.inverse_cdf_sample(torch.full((1, 4), -math.inf), u[:1], order="descending")


def test_unknown_order_is_a_clear_error():
    logits, u = torch.randn(2, 10), torch.rand(2)
    message = "kforcing.inverse_cdf_sample: `order` must be"
    for call in (lambda: ko.inverse_cdf_sample(logits, u, order="ascending"),
                 lambda: ref.inverse_cdf_sample(logits, u, order="ascending"),
                 lambda: torch.ops.kforcing.inverse_cdf_sample(logits, u, None, 1.0, 0, 1.0, "ascending")):
        with pytest.raises(ValueError, match=message):
            call()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        with pytest.raises(ValueError, match=message):
            torch.ops.kforcing.inverse_cdf_sample(mode.from_tensor(logits), mode.from_tensor(u), None, 1.0, 0, 1.0,
                                                  "ascending")


# --------------------------------------------------------------------------------------------------------
# Registration, compile, CUDA graphs


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, u = torch.randn(6, 300, device=device), torch.rand(6, device=device)
    for args in [(logits, u, None, 1.0, 0, 1.0), (logits, u, torch.rand(6, device=device) + 0.5, 1.0, 20, 0.9),
                 (logits, u, None, 0.7, 0, 1.0, "descending"),
                 (logits, u, torch.rand(6, device=device) + 0.5, 1.0, 20, 0.9, "descending")]:
        torch.library.opcheck(torch.ops.kforcing.inverse_cdf_sample.default, args)


def test_valid_arguments_make_no_lazy_message_checks(monkeypatch):
    """torch 2.11's dynamo cannot trace torch._check_value/_check_type given a constant condition and a lazy
    message, which broke torch.compile(fullgraph=True) of the ops there: checks that hold must make no such call."""
    def refuse(*args, **kwargs):
        raise AssertionError("a check that holds called torch._check_value/_check_type")

    monkeypatch.setattr(torch, "_check_value", refuse)
    monkeypatch.setattr(torch, "_check_type", refuse)
    ref.inverse_cdf_sample(torch.randn(3, 50), torch.rand(3), 0.7, 5, 0.9, order="descending")
    ref.noise_embedding(torch.rand(4), 0.5, torch.randn(8, 16), torch.randn(8), code="dyadic")
    ref.decode_linear(torch.randn(2, 16), torch.randn(8, 16), torch.randn(8))
    q, k, v = (torch.randn(1, 5 + 5 * 2, 2, 8) for _ in range(3))
    ref.window_attention(q, k, v, 5, 2)
    with pytest.raises(AssertionError, match="a check that holds"):  # a failing check still reaches torch._check_*
        ref.inverse_cdf_sample(torch.randn(3, 50), torch.rand(3), order="sideways")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def sample(logits, u):
        return ko.inverse_cdf_sample(logits * 2.0, u, temperature=0.7, top_k=10)

    logits, u = torch.randn(5, 100, device=device), torch.rand(5, device=device)
    assert torch.equal(sample(logits, u), ko.inverse_cdf_sample(logits * 2.0, u, 0.7, 10))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def sample_descending(logits, u):
        return ko.inverse_cdf_sample(logits * 2.0, u, temperature=0.7, order="descending")

    with expect_kernel("inverse_cdf_sample"):
        got = sample_descending(logits, u)
    assert torch.equal(got, ko.inverse_cdf_sample(logits * 2.0, u, 0.7, order="descending"))


@pytest.mark.cuda
@pytest.mark.parametrize("top_k", [0, 8])
@pytest.mark.parametrize("order", ["vocab", "descending"])
def test_cuda_graph_capture(top_k, order):
    logits, u = torch.randn(16, 50257, device="cuda"), torch.rand(16, device="cuda")
    out = ko.inverse_cdf_sample(logits, u, 1.0, top_k, order=order)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ko.inverse_cdf_sample(logits, u, 1.0, top_k, order=order)
    logits.copy_(torch.randn_like(logits))
    u.copy_(torch.rand_like(u))
    graph.replay()
    assert torch.equal(out, ko.inverse_cdf_sample(logits, u, 1.0, top_k, order=order))


@pytest.mark.cuda
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (30, 0.9)])
@pytest.mark.parametrize("order", ["vocab", "descending"])
def test_cuda_agrees_with_cpu(top_k, top_p, order):
    logits, u = torch.randn(500, 20000), torch.rand(500, dtype=torch.float64)
    cpu = ko.inverse_cdf_sample(logits, u, 1.3, top_k, top_p, order=order)
    cuda = ko.inverse_cdf_sample(logits.cuda(), u.cuda(), 1.3, top_k, top_p, order=order).cpu()
    assert (cpu != cuda).sum() <= 1


# reference.cdf_interval: the interval of u that inverse_cdf_sample maps to a token

@pytest.mark.parametrize("order", ["vocab", "descending"])
@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (20, 0.9, 0.7)])
def test_cdf_interval_holds_the_uniform_and_maps_back_to_the_token(order, top_k, top_p, temperature):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(400, 97, generator=generator) * 3
    u = torch.rand(400, generator=generator, dtype=torch.float64)
    tokens = ref.inverse_cdf_sample(logits, u, temperature, top_k, top_p, order)
    lower, upper = ref.cdf_interval(logits, tokens, temperature, top_k, top_p, order)
    assert ((lower < u) & (u <= upper)).all()
    for share in (1e-3, 0.5, 1 - 1e-3):
        inside = lower + share * (upper - lower)
        assert torch.equal(ref.inverse_cdf_sample(logits, inside, temperature, top_k, top_p, order), tokens)
        with expect_kernel("inverse_cdf_sample"):
            got = ko.inverse_cdf_sample(logits, inside, temperature, top_k, top_p, order=order)
        assert_agrees(got, logits, inside, temperature, top_k, top_p, order)


@pytest.mark.parametrize("order", ["vocab", "descending"])
def test_cdf_intervals_tile_the_unit_interval_in_walk_order(order):
    row = torch.randn(1, 31, generator=torch.Generator().manual_seed(2))
    row[0, 4] = -math.inf  # a dead token: outside the support, it has no interval
    walk = [t for t in walk_order(row, order)[0].tolist() if t != 4]  # the support, in walk order
    lower, upper = ref.cdf_interval(row.expand(len(walk), 31), torch.tensor(walk), 0.8, 0, 1.0, order)
    assert lower[0] == 0 and torch.equal(lower[1:], upper[:-1])  # consecutive in the walk, no gaps
    torch.testing.assert_close(upper[-1], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(upper - lower, torch.softmax(row[0].double() / 0.8, dim=0)[walk])


def test_cdf_interval_errors_name_the_argument():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="`tokens` must be int64 of shape"):
        ref.cdf_interval(logits, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="sampling support"):
        ref.cdf_interval(logits, logits.topk(10).indices[:, -1], top_k=2)


def test_sampling_probabilities_are_the_samplers_distribution():
    """The probabilities of each token equal the width of the u interval inverse_cdf_sample maps to it; filtered
    tokens have none; each row sums to 1."""
    torch.manual_seed(0)
    logits = torch.randn(6, 40)
    logits[0, :30] = float("-inf")
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 10, 0.9), (2.0, 3, 1.0)):
        probs = ko.sampling_probabilities(logits, temperature, top_k, top_p)
        assert probs.dtype == torch.float64 and probs.shape == logits.shape
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(6, dtype=torch.float64))
        support = probs > 0
        for row in range(6):
            tokens = support[row].nonzero().flatten()
            lower, upper = ko.reference.cdf_interval(logits[row:row + 1].expand(len(tokens), -1), tokens,
                                                     temperature, top_k, top_p)
            torch.testing.assert_close(probs[row, tokens], upper - lower)
    assert bool((ko.sampling_probabilities(logits)[0, :30] == 0).all())
