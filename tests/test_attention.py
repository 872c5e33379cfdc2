"""window_attention and window_attention_decode: kernels against the float64 reference, gradients, decode
equivalence with the training staircase, the in-place cache, bad input and registration."""

import itertools

import pytest
import torch
from conftest import DEVICES, expect_kernel
from tolerances import assert_within_pytorch_error

import kforcing_ops as ko
from kforcing_ops import reference as ref

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}
# The odd shapes: context rows, window sizes, kv heads for H = 6, head dims.
CONTEXTS, WINDOWS, KV_HEADS, HEAD_DIMS = [1, 19, 37, 130], [1, 3, 4, 8], [1, 2, 6], [16, 40, 64, 128]


def staircase_inputs(batch, context, num_windows, window, heads, kv_heads, dim, dtype, device, grad=False):
    seq = context + num_windows * window
    make = lambda h: torch.randn(batch, seq, h, dim, device=device, dtype=dtype, requires_grad=grad)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def num_windows_for(context):
    return max(1, context - 3)  # num_windows < N (and == N in the dedicated test)


def shapes(device, dtype):
    """The cartesian product on CPU in fp32; a covering subset elsewhere (every value of every axis appears)."""
    full = list(itertools.product(CONTEXTS, WINDOWS, KV_HEADS, HEAD_DIMS))
    if device == "cpu" and dtype == torch.float32:
        return full
    return full[::7]


def forward_cases():
    for device in ("cpu", "cuda"):
        for dtype in DTYPES[device]:
            for shape in shapes(device, dtype):
                marks = [pytest.mark.cuda] if device == "cuda" else []
                yield pytest.param(device, dtype, *shape, marks=marks, id=f"{device}-{str(dtype)[6:]}-{shape}")


@pytest.mark.parametrize("device,dtype,context,window,kv_heads,dim", list(forward_cases()))
def test_forward_matches_reference(device, dtype, context, window, kv_heads, dim):
    nw = num_windows_for(context)
    q, k, v = staircase_inputs(2, context, nw, window, 6, kv_heads, dim, dtype, device)
    with expect_kernel("window_attention"):
        got = ko.window_attention(q, k, v, nw, window)
    exact = ref.window_attention(q.double(), k.double(), v.double(), nw, window)
    plain = ref.window_attention(q, k, v, nw, window)
    assert got.dtype == dtype and got.shape == q.shape
    assert_within_pytorch_error(got, plain, exact, dtype, "out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 2, 16])
def test_every_context_row_has_a_window(device, window):
    q, k, v = staircase_inputs(1, 21, 21, window, 4, 2, 32, torch.float32, device)
    got = ko.window_attention(q, k, v, 21, window)
    want = ref.window_attention(q.double(), k.double(), v.double(), 21, window)
    assert_within_pytorch_error(got, ref.window_attention(q, k, v, 21, window), want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_no_windows_is_causal_attention(device):
    q, k, v = staircase_inputs(2, 50, 0, 4, 4, 4, 32, torch.float32, device)
    causal = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(ko.window_attention(q, k, v, 0, 4), causal, atol=1e-5, rtol=1e-5)


def gradient_cases():
    for device in ("cpu", "cuda"):
        for dtype in DTYPES[device]:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            for shape in [(19, 3, 2, 40), (37, 4, 6, 64), (130, 8, 1, 128), (1, 1, 1, 16)]:
                yield pytest.param(device, dtype, *shape, marks=marks, id=f"{device}-{str(dtype)[6:]}-{shape}")


@pytest.mark.parametrize("device,dtype,context,window,kv_heads,dim", list(gradient_cases()))
def test_gradients_match_reference(device, dtype, context, window, kv_heads, dim):
    nw = num_windows_for(context)
    q, k, v = staircase_inputs(2, context, nw, window, 6, kv_heads, dim, dtype, device, grad=True)
    grad_out = torch.randn_like(q)
    with expect_kernel("window_attention", "window_attention_backward"):
        got = torch.autograd.grad(ko.window_attention(q, k, v, nw, window), (q, k, v), grad_out)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(ref.window_attention(*exact_inputs, nw, window), exact_inputs, grad_out.double())
    plain = torch.autograd.grad(ref.window_attention(q, k, v, nw, window), (q, k, v), grad_out)
    for name, g, p, e in zip(("dq", "dk", "dv"), got, plain, exact):
        assert g.dtype == dtype
        assert_within_pytorch_error(g, p, e, dtype, name)


def test_gradcheck_float64():
    """On CPU: the CUDA kernels have no float64 path (their gradients are compared with float64 above)."""
    for context, nw, window, kv_heads in [(3, 2, 2, 1), (5, 5, 3, 2)]:
        q, k, v = staircase_inputs(1, context, nw, window, 2, kv_heads, 8, torch.float64, "cpu", grad=True)
        assert torch.autograd.gradcheck(lambda q, k, v: ko.window_attention(q, k, v, nw, window), (q, k, v),
                                        fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(2, 6, 19 + 5 * 3, 40, device=device)  # (B, H, S, D): q.transpose(1, 2) is strided
    q = base.transpose(1, 2)
    kv = torch.randn(2, 19 + 5 * 3, 2, 80, device=device)[..., ::2]  # strided head_dim
    got = ko.window_attention(q, kv, kv, 5, 3)
    torch.testing.assert_close(got, ko.window_attention(q.contiguous(), kv.contiguous(), kv.contiguous(), 5, 3))
    torch.testing.assert_close(got, ref.window_attention(q, kv, kv, 5, 3), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    q, k, v = staircase_inputs(0, 7, 3, 2, 4, 2, 16, torch.float32, device, grad=True)
    out = ko.window_attention(q, k, v, 3, 2)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("device", DEVICES)
def test_self_forcing_layout_needs_nothing_special(device):
    """Window size 2k with token rows first: a token row's output equals that of a context row at its position."""
    k_tokens, context = 2, 12
    window = 2 * k_tokens
    q, k, v = staircase_inputs(1, context, context, window, 4, 4, 32, torch.float64, device)
    out = ko.window_attention(q, k, v, context, window)
    torch.testing.assert_close(out, ref.window_attention(q, k, v, context, window))


# --------------------------------------------------------------------------------------------------------
# Long windows: the in-window keys span several 64-key tiles

LONG_WINDOWS = [63, 64, 65, 127, 128, 200]


def long_window_cases():
    for device in ("cpu", "cuda"):
        for dtype in DTYPES[device]:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            dims = [64] if device == "cpu" else [40, 64]  # CUDA: the SIMT path (40) and tensor cores (bf16/fp16 64)
            for window in LONG_WINDOWS:
                for dim in dims:
                    yield pytest.param(device, dtype, window, dim, marks=marks,
                                       id=f"{device}-{str(dtype)[6:]}-W{window}-D{dim}")


@pytest.mark.parametrize("device,dtype,window,dim", list(long_window_cases()))
def test_long_windows_forward_and_backward(device, dtype, window, dim):
    """Windows of more than 64 hint rows (they used to overrun the 64-row tile buffers): forward and gradients
    against float64, with 3 windows (the last at the end of the sequence) and N not a multiple of 16."""
    context, nw = 19, 3
    q, k, v = staircase_inputs(1, context, nw, window, 4, 2, dim, dtype, device, grad=True)
    grad_out = torch.randn_like(q)
    with expect_kernel("window_attention", "window_attention_backward"):
        out = ko.window_attention(q, k, v, nw, window)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_out = ref.window_attention(*exact_inputs, nw, window)
    exact = torch.autograd.grad(exact_out, exact_inputs, grad_out.double())
    plain_out = ref.window_attention(q, k, v, nw, window)
    plain = torch.autograd.grad(plain_out, (q, k, v), grad_out)
    assert_within_pytorch_error(out, plain_out, exact_out, dtype, "out")
    for name, g, p, e in zip(("dq", "dk", "dv"), got, plain, exact):
        assert_within_pytorch_error(g, p, e, dtype, name)


def test_long_window_gradcheck_float64():
    q, k, v = staircase_inputs(1, 2, 2, 70, 2, 1, 2, torch.float64, "cpu", grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: ko.window_attention(q, k, v, 2, 70), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_window_product_overflow_is_rejected(device):
    """num_windows * window_size wraps around int64 (4 * (2^62 + 1) = 4 mod 2^64): rejected, not run."""
    q, k, v = staircase_inputs(1, 10, 0, 1, 2, 1, 8, torch.float32, device)
    for call in (lambda: ko.window_attention(q, k, v, 4, 2**62 + 1),
                 lambda: torch.ops.kforcing.window_attention(q, k, v, 4, 2**62 + 1, 1.0),
                 lambda: ref.window_attention(q, k, v, 4, 2**62 + 1)):
        with pytest.raises(ValueError, match="kforcing.window_attention: `q` has 10 rows, which must be N context"):
            call()
    with pytest.raises(ValueError, match="kforcing.window_attention_backward: `q` has 10 rows"):
        torch.ops.kforcing.window_attention_backward(q, q, k, v, q, q.new_zeros(1, 2, 10), 4, 2**62 + 1, 1.0)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        with pytest.raises(ValueError, match="kforcing.window_attention: `q` has 10 rows"):
            torch.ops.kforcing.window_attention(fq, fk, fv, 4, 2**62 + 1, 1.0)
    # Without windows, window_size only names the layout: any value runs.
    torch.testing.assert_close(ko.window_attention(q, k, v, 0, 2**62 + 1), ko.window_attention(q, k, v, 0, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_head_dim_is_a_clear_error(device):
    q = torch.randn(1, 5, 2, 0, device=device)
    for call in (lambda: ko.window_attention(q, q, q, 1, 2),
                 lambda: torch.ops.kforcing.window_attention(q, q, q, 1, 2, 1.0),
                 lambda: ref.window_attention(q, q, q, 1, 2)):
        with pytest.raises(ValueError, match="kforcing.window_attention: `q` must have head_dim >= 1"):
            call()
    cache = torch.zeros(1, 8, 2, 0, device=device)
    lengths = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="kforcing.window_attention_decode: `q` must have head_dim >= 1"):
        ko.window_attention_decode(q, q, q, cache, cache.clone(), lengths, 1)


# --------------------------------------------------------------------------------------------------------
# Decode


def decode_inputs(batch, lengths, max_len, new_rows, heads, kv_heads, dim, dtype, device):
    q = torch.randn(batch, new_rows, heads, dim, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(batch, new_rows, kv_heads, dim, device=device, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, max_len, kv_heads, dim, device=device, dtype=dtype) for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return q, k_new, v_new, k_cache, v_cache, seqlens


def decode_cases():
    for device in ("cpu", "cuda"):
        for dtype in DTYPES[device]:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            for new_rows, kv_heads, dim, n_commit in [(1, 6, 64, 1), (8, 2, 40, 4), (32, 1, 128, 16), (5, 3, 16, 0)]:
                yield pytest.param(device, dtype, new_rows, kv_heads, dim, n_commit, marks=marks,
                                   id=f"{device}-{str(dtype)[6:]}-T{new_rows}-kv{kv_heads}-D{dim}-c{n_commit}")


@pytest.mark.parametrize("device,dtype,new_rows,kv_heads,dim,n_commit", list(decode_cases()))
def test_decode_matches_reference_and_writes_only_committed_rows(device, dtype, new_rows, kv_heads, dim, n_commit):
    lengths, max_len = [0, 1, 37, 200 - n_commit], 200
    q, k_new, v_new, k_cache, v_cache, seqlens = decode_inputs(4, lengths, max_len, new_rows, 6, kv_heads, dim,
                                                               dtype, device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    with expect_kernel("window_attention_decode"):
        got = ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, n_commit)
    exact = ref.window_attention_decode(*(t.double() for t in (q, k_new, v_new, before_k, before_v)),
                                        seqlens, n_commit)
    plain = ref.window_attention_decode(q, k_new, v_new, before_k.clone(), before_v.clone(), seqlens, n_commit)
    assert_within_pytorch_error(got, plain, exact, dtype, "decode out")
    for b, length in enumerate(lengths):
        written = slice(length, length + n_commit)
        assert torch.equal(k_cache[b, written], k_new[b, :n_commit])
        assert torch.equal(v_cache[b, written], v_new[b, :n_commit])
        for cache, before in ((k_cache, before_k), (v_cache, before_v)):
            assert torch.equal(cache[b, :length], before[b, :length])
            assert torch.equal(cache[b, length + n_commit:], before[b, length + n_commit:])
    assert seqlens.tolist() == lengths  # the caller advances the lengths


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_tokens", [1, 2, 4])
def test_decode_steps_equal_the_training_staircase(device, k_tokens):
    """Prefill + repeated [k committed | k hints] steps give the staircase outputs of the same rows."""
    context, prompt, heads, kv_heads, dim = 23, 7, 4, 2, 32
    q, k, v = staircase_inputs(2, context, context, k_tokens, heads, kv_heads, dim, torch.float64, device)
    want = ko.window_attention(q, k, v, context, k_tokens)
    hint = lambda t: slice(context + t * k_tokens, context + (t + 1) * k_tokens)  # noqa: E731
    max_len = context + 5
    k_cache = torch.full((2, max_len, kv_heads, dim), 7.0, dtype=torch.float64, device=device)
    v_cache = k_cache.clone()
    seqlens = torch.zeros(2, dtype=torch.int32, device=device)
    position = 0
    steps = [prompt] + [k_tokens] * ((context - prompt) // k_tokens)
    for committed in steps:
        rows = slice(position, position + committed)
        anchor = position + committed - 1
        new = lambda t: torch.cat([t[:, rows], t[:, hint(anchor)]], dim=1)  # noqa: E731
        got = ko.window_attention_decode(new(q), new(k), new(v), k_cache, v_cache, seqlens, committed)
        torch.testing.assert_close(got[:, :committed], want[:, rows])
        torch.testing.assert_close(got[:, committed:], want[:, hint(anchor)])
        seqlens += committed
        position += committed
    assert torch.equal(k_cache[:, :position], k[:, :position])
    assert torch.equal(v_cache[:, :position], v[:, :position])
    assert (k_cache[:, position:] == 7.0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_long_cache(device):
    q, k_new, v_new, k_cache, v_cache, seqlens = decode_inputs(2, [32760, 4000], 32768, 8, 4, 4, 64,
                                                               torch.float32, device)
    got = ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, 8)
    exact = ref.window_attention_decode(q.double(), k_new.double(), v_new.double(), k_cache.double(),
                                        v_cache.double(), seqlens, 8)
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------
# Bad input


def test_window_attention_errors_name_the_argument():
    q, k, v = staircase_inputs(1, 5, 2, 3, 6, 2, 16, torch.float32, "cpu")
    cases = [
        (lambda: ko.window_attention(q[0], k, v, 2, 3), ValueError, "`q` must be 4-D"),
        (lambda: ko.window_attention(q, k[:, :-1], v[:, :-1], 2, 3), ValueError, "`k` must have size 11 in dim 1"),
        (lambda: ko.window_attention(q, torch.randn(1, 11, 4, 16), torch.randn(1, 11, 4, 16), 2, 3), ValueError,
         "kv heads of `k` \\(4\\) must divide the heads of `q` \\(6\\)"),
        (lambda: ko.window_attention(q, k, v, 3, 3), ValueError, "must be N context rows"),
        (lambda: ko.window_attention(q, k, v, 2, 0), ValueError, "`window_size` must be >= 1"),
        (lambda: ko.window_attention(q, k.double(), v, 2, 3), TypeError, "one dtype"),
        (lambda: ko.window_attention(q.half(), k.half(), v.half(), 2, 3), TypeError, "`q` must have dtype"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_decode_errors_and_overflow_never_writes():
    q, k_new, v_new, k_cache, v_cache, seqlens = decode_inputs(2, [3, 10], 12, 4, 6, 2, 16, torch.float32, "cpu")
    before = k_cache.clone()
    with pytest.raises(ValueError, match="cache overflow: sequence 1 has 10 cached rows"):
        ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, 4)
    assert torch.equal(k_cache, before)
    cases = [
        (lambda: ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, 5), ValueError,
         "`n_commit` must be in \\[0, T=4\\]"),
        (lambda: ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens.long(), 1), TypeError,
         "`cache_seqlens` must have dtype"),
        (lambda: ko.window_attention_decode(q, k_new[:, :3], v_new[:, :3], k_cache, v_cache, seqlens, 1), ValueError,
         "`k_new` must have size 4 in dim 1"),
        (lambda: ko.window_attention_decode(q, k_new, v_new, k_cache[:1], v_cache[:1], seqlens, 1), ValueError,
         "`k_cache` must have size 2 in dim 0"),
        (lambda: ko.window_attention_decode(q, k_new, v_new, k_cache.double(), v_cache, seqlens, 1), TypeError,
         "one dtype"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def decode_layout_cases():
    """(what, make) pairs: make(q, k_new, v_new, k_cache, v_cache) returns the bad argument tuple."""
    def expanded(args):
        q, k_new, v_new, k_cache, v_cache = args
        return q, k_new, v_new, k_cache[:1].expand_as(k_cache), v_cache

    def same_cache(args):
        q, k_new, v_new, k_cache, _ = args
        return q, k_new, v_new, k_cache, k_cache

    def k_new_in_cache(args):
        q, _, v_new, k_cache, v_cache = args
        return q, k_cache[:, 4:8], v_new, k_cache, v_cache

    def v_new_in_cache(args):
        q, k_new, _, k_cache, v_cache = args
        return q, k_new, v_cache[:, 8:12], k_cache, v_cache

    def overlapping_caches(args):
        q, k_new, v_new, k_cache, _ = args
        both = torch.cat([k_cache, k_cache[:, :1]], dim=1)
        return q, k_new, v_new, both[:, :-1], both[:, 1:]

    return [("`k_cache` and `v_cache` must not be expanded", expanded),
            ("`k_cache` and `v_cache` must not share memory", same_cache),
            ("`k_cache` and `v_cache` must not share memory", overlapping_caches),
            ("`k_new` must not share memory with `k_cache` or `v_cache`", k_new_in_cache),
            ("`v_new` must not share memory with `k_cache` or `v_cache`", v_new_in_cache)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("message,make", decode_layout_cases(), ids=lambda c: getattr(c, "__name__", None))
def test_decode_rejects_aliased_or_expanded_caches(device, message, make):
    """Caches written in place must be their own memory, and nothing read may live in them: checked from
    storage and strides (no data access), identically by the kernel, the fake kernel and the reference."""
    q, k_new, v_new, k_cache, v_cache, seqlens = decode_inputs(2, [3, 5], 16, 4, 4, 2, 8, torch.float32, device)
    args = make((q, k_new, v_new, k_cache, v_cache))
    before = [t.clone() for t in args]
    for call in (ko.window_attention_decode, ref.window_attention_decode):
        with pytest.raises(ValueError, match=f"kforcing.window_attention_decode: {message}"):
            call(*args, seqlens, 2)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (*args, seqlens)]
        with pytest.raises(ValueError, match=message):
            torch.ops.kforcing.window_attention_decode(*fake, 2, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(args, before))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_accepts_disjoint_views_of_one_buffer(device):
    """k and v caches as two halves of one allocation, and a cache that is a slice of a larger one, are fine."""
    q, k_new, v_new, _, _, seqlens = decode_inputs(2, [3, 5], 16, 4, 4, 2, 8, torch.float32, device)
    buffer = torch.randn(2, 2, 20, 2, 8, device=device)
    k_cache, v_cache = buffer[0, :, :16], buffer[1, :, 2:18]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = ref.window_attention_decode(q, k_new, v_new, want_k, want_v, seqlens, 2)
    with expect_kernel("window_attention_decode"):
        got = ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, 2)
    torch.testing.assert_close(got, want)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_lengths_aliasing_the_cache_are_read_once(device):
    """cache_seqlens living in the first cache row of sequence 0: its append overwrites them mid-call, but the
    kernel has copied them first, so sequence 1 still writes rows [6, 8) and nothing past the cache."""
    batch, max_len, kv_heads, dim, n_commit = 2, 8, 1, 4, 2
    storage = torch.zeros(batch * max_len * kv_heads * dim + 4, device=device)  # 4 sentinel elements at the end
    k_cache = storage[:-4].view(batch, max_len, kv_heads, dim)
    seqlens = k_cache[0, 0, 0].view(torch.int32)[:batch]
    seqlens.copy_(torch.tensor([0, 6], dtype=torch.int32))
    v_cache = torch.zeros_like(k_cache)
    q = torch.randn(batch, n_commit, 1, dim, device=device)
    k_new, v_new = torch.randn(batch, n_commit, kv_heads, dim, device=device) + 1e6, torch.randn_like(q)
    with expect_kernel("window_attention_decode"):
        ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, n_commit)
    assert torch.equal(k_cache[0, :n_commit], k_new[0]) and torch.equal(k_cache[1, 6:8], k_new[1])
    assert torch.equal(v_cache[1, 6:8], v_new[1]) and (storage[-4:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_zero_heads_is_a_clear_error(device):
    q, k_new, v_new, k_cache, v_cache, seqlens = decode_inputs(2, [3, 5], 16, 4, 4, 2, 8, torch.float32, device)
    before = k_cache.clone()
    for call in (ko.window_attention_decode, ref.window_attention_decode):
        with pytest.raises(ValueError, match="kforcing.window_attention_decode: `q` must have at least one head"):
            call(q[:, :, :0], k_new, v_new, k_cache, v_cache, seqlens, 2)
    assert torch.equal(k_cache, before)


@pytest.mark.cuda
def test_decode_cuda_head_dim_within_shared_memory():
    """head_dim 256 needs ~160 KB of shared memory: run where the GPU has it, a clear error where it does not."""
    q, k_new, v_new, k_cache, v_cache, seqlens = decode_inputs(2, [3, 5], 16, 4, 4, 2, 256, torch.float16, "cuda")
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    if (32 * 256 + 64 * 257 + 64 * 256) * 4 > limit:
        with pytest.raises(ValueError, match="head_dim 256 needs .* bytes of shared memory"):
            ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, 2)
    else:
        got = ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, 2)
        assert torch.isfinite(got).all()


@pytest.mark.cuda
def test_tensor_core_path_takes_misaligned_views_safely():
    """A contiguous bf16 view at an odd element offset cannot use the 16-byte loads of the tensor-core kernels:
    it runs on the CUDA-core kernels and matches the aligned result."""
    q, k, v = staircase_inputs(1, 40, 10, 4, 4, 2, 64, torch.bfloat16, "cuda")
    shifted = [torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)[1:].view(t.shape).copy_(t) for t in (q, k, v)]
    assert shifted[0].data_ptr() % 16 != 0 and shifted[0].is_contiguous()
    for t in shifted:
        t.requires_grad_()
    grad_out = torch.randn_like(q)
    out = ko.window_attention(*shifted, 10, 4)
    grads = torch.autograd.grad(out, shifted, grad_out)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_out = ref.window_attention(*exact_inputs, 10, 4)
    exact = torch.autograd.grad(exact_out, exact_inputs, grad_out.double())
    plain_inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    plain_out = ref.window_attention(*plain_inputs, 10, 4)
    plain = torch.autograd.grad(plain_out, plain_inputs, grad_out)
    assert_within_pytorch_error(out, plain_out, exact_out, torch.bfloat16, "out")
    for name, g, p, e in zip(("dq", "dk", "dv"), grads, plain, exact):
        assert_within_pytorch_error(g, p, e, torch.bfloat16, name)


# --------------------------------------------------------------------------------------------------------
# Registration


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    q, k, v = staircase_inputs(2, 9, 4, 3, 4, 2, 16, dtype, device, grad=True)
    scale = 16 ** -0.5
    torch.library.opcheck(torch.ops.kforcing.window_attention.default, (q, k, v, 4, 3, scale))
    out, lse = torch.ops.kforcing.window_attention(q, k, v, 4, 3, scale)
    torch.library.opcheck(torch.ops.kforcing.window_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 4, 3,
                           scale))
    args = decode_inputs(2, [3, 5], 16, 4, 4, 2, 16, dtype, device)
    torch.library.opcheck(torch.ops.kforcing.window_attention_decode.default, (*args, 2, scale))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_both_ops(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k, v, qd, kd, vd, k_cache, v_cache, seqlens):
        train = ko.window_attention(q, k, v, 4, 3)
        decode = ko.window_attention_decode(qd, kd, vd, k_cache, v_cache, seqlens, 2)
        return train.sum() + decode.sum()

    q, k, v = staircase_inputs(2, 9, 4, 3, 4, 2, 16, torch.float32, device, grad=True)
    dec = decode_inputs(2, [3, 5], 16, 4, 4, 2, 16, torch.float32, device)
    caches = (dec[3].clone(), dec[4].clone())
    got = step(q, k, v, dec[0], dec[1], dec[2], *caches, dec[5])
    got.backward()
    want = ko.window_attention(q, k, v, 4, 3).sum() + ko.window_attention_decode(*dec, 2).sum()
    torch.testing.assert_close(got, want)
    assert torch.equal(caches[0], dec[3]) and q.grad is not None


@pytest.mark.cuda
def test_decode_cuda_graph_capture():
    args = decode_inputs(4, [10, 20, 30, 40], 64, 8, 8, 2, 64, torch.bfloat16, "cuda")
    q, k_new, v_new, k_cache, v_cache, seqlens = args
    ko.window_attention_decode(q, k_new, v_new, k_cache.clone(), v_cache.clone(), seqlens, 4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, 4)
    seqlens += 4
    q.copy_(torch.randn_like(q))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    graph.replay()
    want = ko.window_attention_decode(q, k_new, v_new, k_ref, v_ref, seqlens, 4)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(k_cache, k_ref)


@pytest.mark.cuda
def test_decode_cuda_overflow_writes_nothing_and_flags_nan():
    q, k_new, v_new, k_cache, v_cache, seqlens = decode_inputs(2, [3, 10], 12, 4, 4, 2, 16, torch.float32, "cuda")
    before = k_cache.clone()
    out = ko.window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens, 4)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    assert torch.equal(k_cache[1], before[1])


# --------------------------------------------------------------------------------------------------------
# The drop-in module


class NanoGPTCausalSelfAttention(torch.nn.Module):
    """nanoGPT's CausalSelfAttention, as users have it."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = torch.nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = torch.nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        batch, seq, channels = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, channels))


def test_window_attention_module_drops_into_nanogpt():
    from kforcing_ops.nn import WindowAttention

    original = NanoGPTCausalSelfAttention(64, 4)
    module = WindowAttention.from_causal_self_attention(original)
    x = torch.randn(2, 30, 64)
    torch.testing.assert_close(module(x), original(x), atol=1e-5, rtol=1e-5)  # no windows: plain causal
    # With windows: context rows keep their causal outputs; hint rows attend per the staircase.
    xw = torch.randn(2, 10 + 10 * 2, 64)
    out = module(xw, num_windows=10, window_size=2)
    torch.testing.assert_close(out[:, :10], original(xw[:, :10]), atol=1e-5, rtol=1e-5)
    # Decode: prefill the 10 context rows, then the hints of the last window see the whole context.
    k_cache, v_cache = torch.zeros(2, 16, 4, 16), torch.zeros(2, 16, 4, 16)
    lengths = torch.zeros(2, dtype=torch.int32)
    step = torch.cat([xw[:, :10], xw[:, -2:]], dim=1)
    got = module.decode(step, k_cache, v_cache, lengths, 10)
    torch.testing.assert_close(got[:, 10:], out[:, -2:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="heads by kv_heads"):
        WindowAttention(64, 4, kv_heads=3)
