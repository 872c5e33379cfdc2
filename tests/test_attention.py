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
