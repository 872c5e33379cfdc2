"""Property-based fuzzing of every op: shapes, strides, dtypes, window sizes, lengths, temperatures and special
values. Every example ends in one of two ways, and nothing else:

  * a clear kforcing error (ValueError / TypeError / RuntimeError whose message starts with "kforcing."), raised
    by the reference as well (the references accept exactly what the kernels accept), or
  * the reference's result, within the tolerances of tests/tolerances.py, with the memory around every buffer
    written in place (the KV caches, views into a larger sentinel-filled allocation) untouched.

On CUDA, where invalid rows cannot raise without a host sync, such rows give -1 (sampler) or NaN (the others)
instead; scripts/gpu_check.sh runs the CUDA profile under compute-sanitizer memcheck, which catches any access
outside the buffers.

Profiles (hypothesis settings): "fast", the default, derandomized so CI is reproducible (about a minute on 2
cores); "slow", many more examples, under the `slow` marker; "cuda", for the GPU check.
"""

import math

import pytest
import torch
from conftest import expect_kernel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sampling import assert_agrees
from tolerances import EMBEDDING_FP32_RTOL, assert_within_pytorch_error

import kforcing_ops as ko
from kforcing_ops import reference as ref

_COMMON = dict(deadline=None, database=None, derandomize=True, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("kforcing-fast", max_examples=25, **_COMMON)
settings.register_profile("kforcing-slow", max_examples=400, **_COMMON)
settings.register_profile("kforcing-cuda", max_examples=40, **_COMMON)
FAST, SLOW, CUDA = (settings.get_profile(f"kforcing-{name}") for name in ("fast", "slow", "cuda"))

ERRORS = (ValueError, TypeError, RuntimeError)
SENTINEL = 1024.0  # exact in every dtype, and far from any value the ops write
TEMPERATURES = [1.0, 0.7, 1e-3, 1e-45, 1e-300, 1e30, 1e300, 0.0, -1.0, math.nan, math.inf]
SPECIAL_LOGITS = [-math.inf, math.nan, math.inf, 0.0, 1.0, -1e4, 1e4]


def outcome(fn):
    """('ok', result) or ('error', exception); only kforcing errors are allowed to escape."""
    try:
        return "ok", fn()
    except ERRORS as error:
        assert str(error).startswith("kforcing."), f"not a kforcing error: {type(error).__name__}: {error}"
        return "error", error


def assert_same_outcome(kernel, reference, device):
    """Both raise kforcing errors, or neither. On CUDA a data-dependent error of the reference (a bad row) may be
    a flagged row of the kernel instead; the caller checks those rows."""
    if kernel[0] == "error" and reference[0] == "ok":
        raise AssertionError(f"the kernel raised but the reference did not: {kernel[1]}")
    if reference[0] == "error" and kernel[0] == "ok" and device == "cpu":
        raise AssertionError(f"the reference raised but the kernel did not: {reference[1]}")


def strided(data, shape, dtype, device, make=None):
    """A tensor of `shape` with values from make(shape) (default randn), contiguous or as a non-contiguous view:
    a transposed copy, every other element of a wider buffer, or a view at an odd offset."""
    values = (make or (lambda s: torch.randn(s, dtype=torch.float64)))(shape)
    layout = data.draw(st.sampled_from(["contiguous", "transposed", "stepped", "offset"]), label="layout")
    if layout == "transposed" and len(shape) >= 2:
        t = torch.empty((*shape[:-2], shape[-1], shape[-2]), dtype=dtype, device=device).transpose(-1, -2)
    elif layout == "stepped" and len(shape) >= 1:
        t = torch.empty((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=device)[..., ::2]
    elif layout == "offset":
        t = torch.empty(math.prod(shape) + 1, dtype=dtype, device=device)[1:].view(shape)
    else:
        t = torch.empty(shape, dtype=dtype, device=device)
    return t.copy_(values.to(dtype))


def sprinkle(data, t, values, label):
    """Writes a few special values at drawn positions of t (in place)."""
    if t.numel() == 0:
        return t
    for _ in range(data.draw(st.integers(0, 3), label=f"{label} count")):
        flat = data.draw(st.integers(0, t.numel() - 1), label=f"{label} index")
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))
        t[index] = data.draw(st.sampled_from(values), label=label)
    return t


# --------------------------------------------------------------------------------------------------------
# inverse_cdf_sample


def check_inverse_cdf_sample(data, device):
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if device == "cpu" else [])
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    rows = data.draw(st.integers(0, 4), label="rows")
    vocab = data.draw(st.sampled_from([1, 2, 7, 100, 2047, 2048, 2049, 4097, 5000]), label="vocab")
    scale = data.draw(st.sampled_from([1e-3, 1.0, 30.0]), label="scale")
    logits = strided(data, (rows, vocab), dtype, device, lambda s: torch.randn(s, dtype=torch.float64) * scale)
    if data.draw(st.booleans(), label="dead tokens") and rows:
        logits[torch.rand(rows, vocab, device=device) < 0.7] = -math.inf
    sprinkle(data, logits, SPECIAL_LOGITS, "logit")
    u = torch.rand(rows, dtype=torch.float64, device=device)
    sprinkle(data, u, [0.0, 1.0, 1e-300, 1 - 1e-16, -0.1, 1.1, math.nan], "u")
    u = u.to(data.draw(st.sampled_from([torch.float32, torch.float64]), label="u dtype"))
    if data.draw(st.booleans(), label="per-row temperature"):
        temperature = torch.tensor([data.draw(st.sampled_from(TEMPERATURES)) for _ in range(rows)],
                                   dtype=torch.float64, device=device)
    else:
        temperature = data.draw(st.sampled_from(TEMPERATURES), label="temperature")
    top_k = data.draw(st.sampled_from([0, 0, 1, 3, vocab, vocab + 5, -1]), label="top_k")
    top_p = data.draw(st.sampled_from([1.0, 1.0, 0.9, 0.5, 1e-9, 0.0, 1.5]), label="top_p")

    with expect_kernel("inverse_cdf_sample"):
        kernel = outcome(lambda: ko.inverse_cdf_sample(logits, u, temperature, top_k, top_p))
    cpu_t = temperature.cpu() if isinstance(temperature, torch.Tensor) else temperature
    reference = outcome(lambda: ref.inverse_cdf_sample(logits.cpu(), u.cpu(), cpu_t, top_k, top_p))
    assert_same_outcome(kernel, reference, device)
    if kernel[0] == "error":
        return
    got = kernel[1].cpu()
    assert got.shape == (rows,) and got.dtype == torch.int64
    assert ((got >= -1) & (got < vocab)).all(), got
    if reference[0] == "ok":
        assert (got >= 0).all(), got
        assert_agrees(got, logits.cpu(), u.cpu().double(), cpu_t, top_k, top_p)
    else:  # CUDA: the invalid rows are -1, every valid row still agrees
        valid = torch.tensor([outcome(lambda r=r: ref.inverse_cdf_sample(
            logits[r:r + 1].cpu(), u[r:r + 1].cpu(), cpu_t[r:r + 1] if isinstance(cpu_t, torch.Tensor) else cpu_t,
            top_k, top_p))[0] == "ok" for r in range(rows)], dtype=torch.bool)
        assert (got[~valid] == -1).all(), got
        if valid.any():
            t_valid = cpu_t[valid] if isinstance(cpu_t, torch.Tensor) else cpu_t
            assert_agrees(got[valid], logits.cpu()[valid], u.cpu().double()[valid], t_valid, top_k, top_p)


# --------------------------------------------------------------------------------------------------------
# window_attention, forward and backward


def check_window_attention(data, device):
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float64] if device == "cpu" else [torch.float16])
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    context = data.draw(st.integers(1, 24), label="N")
    window = data.draw(st.sampled_from([1, 2, 3, 5, 63, 64, 65, 100, 130]), label="window_size")
    num_windows = data.draw(st.integers(0, min(context, max(1, 400 // window))), label="num_windows")
    kv_heads = data.draw(st.integers(1, 2), label="kv_heads")
    heads = kv_heads * data.draw(st.integers(1, 3), label="group")
    dim = data.draw(st.sampled_from([1, 3, 8, 16] + ([64] if device == "cuda" else [])), label="head_dim")
    batch = data.draw(st.integers(1, 2), label="batch")
    seq = context + num_windows * window
    bad = data.draw(st.sampled_from([None] * 6 + ["window 0", "window huge", "too many windows", "kv heads",
                                                 "dtype"]), label="bad input")
    call_windows, call_window = num_windows, window
    if bad == "window 0":
        call_window = 0
    elif bad == "window huge":
        call_windows, call_window = max(1, num_windows), 2**62 + 1
    elif bad == "too many windows":
        call_windows = context + 1
    q = strided(data, (batch, seq, heads, dim), dtype, device)
    k = strided(data, (batch, seq, kv_heads + (bad == "kv heads"), dim), dtype, device)
    v = strided(data, tuple(k.shape), torch.float32 if bad == "dtype" and dtype != torch.float32 else dtype, device)
    grad_out = torch.randn(q.shape, device=device).to(dtype)
    scale = dim ** -0.5

    def run(fn, *tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves, call_windows, call_window, scale)
        return (out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))

    kernel = outcome(lambda: run(ko.window_attention, q, k, v))
    reference = outcome(lambda: run(ref.window_attention, q, k, v))
    assert_same_outcome(kernel, reference, "cpu")  # no data-dependent errors here: CUDA raises alike
    if kernel[0] == "error":
        return
    exact = run(ref.window_attention, q.double(), k.double(), v.double())
    for name, got, plain, want in zip(("out", "dq", "dk", "dv"), kernel[1], reference[1], exact):
        assert got.dtype == dtype and got.shape == plain.shape
        assert_within_pytorch_error(got, plain, want, dtype, name)


# --------------------------------------------------------------------------------------------------------
# window_attention_decode


def in_sentinel_buffer(data, values, device):
    """`values` copied into a view of a larger sentinel-filled buffer (padding on every side and between rows);
    returns (view, buffer, mask of the view's elements in the buffer)."""
    pads = [data.draw(st.integers(0, 2), label="pad") for _ in range(values.dim() - 1)]
    shape = [n + p for n, p in zip(values.shape[:-1], pads)] + [values.shape[-1] + 1]
    buffer = torch.full([2, *shape], SENTINEL, dtype=values.dtype, device=device)
    index = (1, *(slice(p, p + n) for p, n in zip(pads, values.shape[:-1])), slice(1, 1 + values.shape[-1]))
    mask = torch.zeros(buffer.shape, dtype=torch.bool, device=device)
    mask[index] = True
    view = buffer[index]
    view.copy_(values)
    return view, buffer, mask


def check_decode(data, device):
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float64] if device == "cpu" else [torch.float16])
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    batch = data.draw(st.integers(1, 3), label="batch")
    max_len = data.draw(st.sampled_from([1, 5, 40, 70, 200]), label="L_max")
    new_rows = data.draw(st.integers(1, 5), label="T")
    n_commit = data.draw(st.integers(0, new_rows), label="n_commit")
    kv_heads = data.draw(st.integers(1, 2), label="kv_heads")
    heads = kv_heads * data.draw(st.integers(0, 3), label="group")  # 0: no heads, a clear error
    dim = data.draw(st.sampled_from([1, 4, 16, 40] + ([64, 128] if device == "cuda" else [])), label="head_dim")
    lengths = [data.draw(st.sampled_from([0, 1, max_len // 2, max_len - n_commit, max_len - n_commit + 1, -1]),
                         label="length") for _ in range(batch)]
    q = strided(data, (batch, new_rows, heads, dim), dtype, device)
    k_new = strided(data, (batch, new_rows, kv_heads, dim), dtype, device)
    v_new = strided(data, (batch, new_rows, kv_heads, dim), dtype, device)
    k_values = torch.randn(batch, max_len, kv_heads, dim, device=device).to(dtype)
    k_cache, k_buffer, k_mask = in_sentinel_buffer(data, k_values, device)
    v_cache, v_buffer, v_mask = in_sentinel_buffer(data, torch.randn_like(k_values), device)
    alias = data.draw(st.sampled_from([None] * 6 + ["expanded", "same cache", "k_new in cache"]), label="alias")
    if alias == "expanded":
        k_cache = k_cache[:1].expand_as(k_cache)
    elif alias == "same cache":
        v_cache = k_cache
    elif alias == "k_new in cache":
        k_new = k_cache[:, :new_rows]  # (when L_max < T, a shape error instead)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    buffers_before = (k_buffer.clone(), v_buffer.clone())
    ref_caches = (k_cache.clone(), v_cache.clone())
    ref_inputs = [t.clone() for t in (q, k_new, v_new)]

    with expect_kernel("window_attention_decode"):
        kernel = outcome(lambda: ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, n_commit))
    if alias is not None:  # the reference must see the very views (clones lose the aliasing); both refuse them
        assert kernel[0] == "error", f"aliased caches ({alias}) were accepted"
        reference = outcome(lambda: ref.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, n_commit))
        assert reference[0] == "error", f"the reference accepted aliased caches ({alias})"
    else:
        reference = outcome(lambda: ref.window_attention_decode(*ref_inputs, *ref_caches, seqlens, n_commit))
    assert_same_outcome(kernel, reference, device)
    if kernel[0] == "error":  # nothing written at all
        assert torch.equal(k_buffer, buffers_before[0]) and torch.equal(v_buffer, buffers_before[1])
        return
    # Nothing outside the caches was written, on any path.
    assert torch.equal(k_buffer[~k_mask], buffers_before[0][~k_mask])
    assert torch.equal(v_buffer[~v_mask], buffers_before[1][~v_mask])
    if reference[0] == "error":  # CUDA, a cache overflow: those sequences are NaN and write nothing
        overflow = torch.tensor([not (0 <= n <= max_len - n_commit) for n in lengths], device=device)
        assert torch.isnan(kernel[1][overflow]).all()
        return
    exact = ref.window_attention_decode(*(t.double() for t in ref_inputs), *(t.double() for t in ref_caches),
                                        seqlens, 0)
    assert_within_pytorch_error(kernel[1], reference[1], exact, dtype, "decode out")
    assert torch.equal(k_cache, ref_caches[0]) and torch.equal(v_cache, ref_caches[1])


# --------------------------------------------------------------------------------------------------------
# noise_embedding, noise_conditioned_embedding

# Valid taus span what a temperature is; features are fp32, so the angle 2 pi tau f of a tau of 1e8 has no correct
# digit left (the docstring says so), and such taus are not drawn.
TAUS = [0.5, 1.0, 1e-8, 3.0, 0.0, -1.0, math.nan, math.inf]


def draw_tau(data, rows, device):
    kind = data.draw(st.sampled_from(["float", "0-d", "tensor"]), label="tau kind")
    if kind == "float":
        return data.draw(st.sampled_from(TAUS), label="tau")
    if kind == "0-d":
        return torch.tensor(data.draw(st.sampled_from(TAUS), label="tau"), device=device)
    tau = torch.rand(rows, dtype=torch.float64, device=device) + 0.05
    return sprinkle(data, tau, TAUS, "tau value").to(data.draw(st.sampled_from([torch.float32, torch.float64])))


def draw_weights(data, hidden, freqs, device):
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if device == "cpu" else [])
    dtype = data.draw(st.sampled_from(dtypes), label="weight dtype")
    weight = strided(data, (hidden, 4 * freqs), dtype, device, lambda s: torch.randn(s, dtype=torch.float64) * 0.3)
    bias = strided(data, (hidden,), dtype, device) if data.draw(st.booleans(), label="bias") else None
    return dtype, weight, bias


def compare_embedding(kernel, reference, exact, dtype, device, nan_rows):
    """The result against the reference, with rows that are invalid on CUDA (NaN there) left out."""
    assert_same_outcome(kernel, reference, device)
    if kernel[0] == "error":
        return
    got = kernel[1]
    if reference[0] == "error":  # CUDA: the invalid rows are NaN, the others exact
        bad = nan_rows()
        assert torch.isnan(got[bad]).all()
        got, plain, want = got[~bad], exact[1][~bad], exact[0][~bad]
    else:
        plain, want = reference[1], exact[0]
    assert got.dtype == dtype
    if got.numel() == 0:
        return
    if dtype in (torch.float32, torch.float64):  # fp32 features (fp64 for fp64 weights), as test_embedding
        assert (got.double() - want).abs().max() <= EMBEDDING_FP32_RTOL * want.abs().max()
    else:
        assert_within_pytorch_error(got, plain, want, dtype, "embedding")


def _valid_tau(tau):
    return (tau > 0) & torch.isfinite(tau)


def check_noise_embedding(data, device):
    rows = data.draw(st.integers(0, 20), label="M")
    freqs, hidden = data.draw(st.integers(1, 8), label="F"), data.draw(st.integers(1, 24), label="H")
    dtype, weight, bias = draw_weights(data, hidden, freqs, device)
    u = strided(data, (rows,), data.draw(st.sampled_from([torch.float32, torch.float64])), device,
                lambda s: torch.rand(s, dtype=torch.float64))
    sprinkle(data, u, [0.0, 1.0, -0.5, 1.5, math.nan], "u")
    tau = draw_tau(data, rows, device)
    with expect_kernel("noise_embedding"):
        kernel = outcome(lambda: ko.noise_embedding(u, tau, weight, bias))
    ref_tau = tau.reshape(1).expand(rows) if isinstance(tau, torch.Tensor) and tau.dim() == 0 else tau
    reference = outcome(lambda: ref.noise_embedding(u, ref_tau, weight, bias))

    def valid_parts():
        ok = (u >= 0) & (u <= 1)
        return ok & _valid_tau(ref_tau) if isinstance(ref_tau, torch.Tensor) else ok

    def exact():
        keep = valid_parts()
        t = ref_tau[keep] if isinstance(ref_tau, torch.Tensor) else ref_tau
        want = ref.noise_embedding(u[keep].double(), t.double() if isinstance(t, torch.Tensor) else t,
                                   weight.double(), bias.double() if bias is not None else None)
        plain = ref.noise_embedding(u[keep], t, weight, bias)
        full_want, full_plain = (torch.full((rows, hidden), math.nan, dtype=x.dtype, device=device)
                                 for x in (want, plain))
        full_want[keep], full_plain[keep] = want, plain
        return full_want, full_plain

    exact_values = exact() if kernel[0] == "ok" and (reference[0] == "ok" or device == "cuda") else None
    compare_embedding(kernel, reference, exact_values, dtype, device, lambda: ~valid_parts())


def check_noise_conditioned_embedding(data, device):
    batch, contexts = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(0, 5), label="Tc")
    hints, vocab = data.draw(st.integers(0, 6), label="Th"), data.draw(st.integers(1, 30), label="V")
    freqs, hidden = data.draw(st.integers(1, 6), label="F"), data.draw(st.integers(1, 24), label="H")
    dtype, weight, bias = draw_weights(data, hidden, freqs, device)
    table = strided(data, (vocab, hidden), dtype, device)
    ids = torch.randint(0, vocab, (batch, contexts), device=device)
    sprinkle(data, ids, [-1, vocab, 0, vocab - 1], "id")
    ids = ids.to(data.draw(st.sampled_from([torch.int64, torch.int32]), label="ids dtype"))
    u = strided(data, (batch, hints), torch.float32, device, lambda s: torch.rand(s, dtype=torch.float64))
    sprinkle(data, u, [0.0, 1.0, -0.5, math.nan], "u")
    tau = draw_tau(data, batch, device)
    with expect_kernel("noise_conditioned_embedding"):
        kernel = outcome(lambda: ko.noise_conditioned_embedding(ids, table, u, tau, weight, bias))
    reference = outcome(lambda: ref.noise_conditioned_embedding(ids, table, u, tau, weight, bias))

    def invalid_rows():
        bad_ids = (ids < 0) | (ids >= vocab)
        bad_u = ~((u >= 0) & (u <= 1))
        if isinstance(tau, torch.Tensor):
            seq_tau = tau.reshape(-1).expand(batch) if tau.dim() == 0 else tau
            bad_u = bad_u | ~_valid_tau(seq_tau)[:, None]
        return torch.cat([bad_ids, bad_u], dim=1)

    def exact():
        bad = invalid_rows()
        safe_ids = ids.clamp(0, vocab - 1)
        safe_u = torch.where(bad[:, contexts:], 0.5, u)
        safe_tau = tau
        if isinstance(tau, torch.Tensor):
            safe_tau = torch.where(_valid_tau(tau), tau, torch.ones_like(tau))
        want = ref.noise_conditioned_embedding(safe_ids, table.double(), safe_u.double(), safe_tau,
                                               weight.double(), bias.double() if bias is not None else None)
        plain = ref.noise_conditioned_embedding(safe_ids, table, safe_u, safe_tau, weight, bias)
        return want, plain

    exact_values = exact() if kernel[0] == "ok" and (reference[0] == "ok" or device == "cuda") else None
    compare_embedding(kernel, reference, exact_values, dtype, device, invalid_rows)


# --------------------------------------------------------------------------------------------------------
# decode_linear


def check_decode_linear(data, device):
    rows = data.draw(st.integers(0, 20), label="M")
    k, n = data.draw(st.integers(0, 70), label="K"), data.draw(st.integers(0, 40), label="N")
    x_dtype, w_dtype = (data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), label=name)
                        for name in ("x dtype", "w dtype"))
    lead = data.draw(st.sampled_from([(rows,), (1, rows), (rows, 1)]), label="leading dims")
    x = strided(data, (*lead, k), x_dtype, device)
    weight = strided(data, (n, k), w_dtype, device)
    bias = strided(data, (n,), w_dtype, device) if data.draw(st.booleans(), label="bias") else None
    sprinkle(data, x, [0.0, -0.0, 1e4, -1e4], "x")
    with expect_kernel("decode_linear"):
        kernel = outcome(lambda: ko.decode_linear(x, weight, bias))
    reference = outcome(lambda: ref.decode_linear(x, weight, bias))
    assert_same_outcome(kernel, reference, device)
    if kernel[0] == "error":
        return
    got, want = kernel[1], reference[1]
    assert got.shape == want.shape and got.dtype == want.dtype
    xd, wd = x.double().reshape(math.prod(lead), k), weight.double()
    exact = (xd @ wd.t() + (0 if bias is None else bias.double())).reshape(want.shape)
    scale = (xd.abs() @ wd.abs().t() + (0 if bias is None else bias.double().abs())).reshape(want.shape)
    # fp32 accumulation (1e-5 of the dot product's magnitude), then one rounding to x's dtype if it is bf16
    bound = 1e-5 * scale + (exact.abs() * 2 ** -8 if x_dtype == torch.bfloat16 else 0) + 1e-30
    assert bool(((got.double() - exact).abs() <= bound).all())


# --------------------------------------------------------------------------------------------------------
# The tests: each property under the fast profile (CPU), the slow profile, and the CUDA profile.

CHECKS = {
    "inverse_cdf_sample": check_inverse_cdf_sample,
    "window_attention": check_window_attention,
    "window_attention_decode": check_decode,
    "noise_embedding": check_noise_embedding,
    "noise_conditioned_embedding": check_noise_conditioned_embedding,
    "decode_linear": check_decode_linear,
}


def _property(check, profile, device):
    @profile
    @given(st.data())
    def run(data):
        check(data, device)

    return run


@pytest.mark.parametrize("op", list(CHECKS))
def test_fuzz(op):
    _property(CHECKS[op], FAST, "cpu")()


@pytest.mark.slow
@pytest.mark.parametrize("op", list(CHECKS))
def test_fuzz_long(op):
    _property(CHECKS[op], SLOW, "cpu")()


@pytest.mark.cuda
@pytest.mark.parametrize("op", list(CHECKS))
def test_fuzz_cuda(op):
    _property(CHECKS[op], CUDA, "cuda")()
