"""The references against independent naive implementations: plain loops over rows, written from docs/method.md."""

import math
from fractions import Fraction

import pytest
import torch

from kforcing_ops import reference as ref


def naive_visible_keys(context, window_size, row):
    """The staircase, from docs/method.md §3: context row s sees 0..s; hint (t, i) sees 0..t and (t, 0..i)."""
    if row < context:
        return list(range(row + 1))
    t, i = divmod(row - context, window_size)
    first = context + t * window_size
    return list(range(t + 1)) + list(range(first, first + i + 1))


def naive_attention_row(q_row, keys, values, scale):
    scores = [scale * sum(a * b for a, b in zip(q_row, key)) for key in keys]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [sum(w * value[d] for w, value in zip(weights, values)) / total for d in range(len(q_row))]


@pytest.mark.parametrize("context,num_windows,window_size,heads,kv_heads", [(5, 3, 2, 4, 2), (4, 4, 3, 2, 1),
                                                                            (6, 1, 1, 3, 3)])
def test_window_attention_reference(context, num_windows, window_size, heads, kv_heads):
    dim, seq = 4, context + num_windows * window_size
    q = torch.randn(2, seq, heads, dim, dtype=torch.float64)
    k, v = (torch.randn(2, seq, kv_heads, dim, dtype=torch.float64) for _ in range(2))
    got = ref.window_attention(q, k, v, num_windows, window_size)
    for b in range(2):
        for h in range(heads):
            hk = h // (heads // kv_heads)  # GQA: consecutive query heads share a kv head
            for r in range(seq):
                keys = naive_visible_keys(context, window_size, r)
                want = naive_attention_row(q[b, r, h].tolist(), [k[b, j, hk].tolist() for j in keys],
                                           [v[b, j, hk].tolist() for j in keys], dim ** -0.5)
                assert got[b, r, h].tolist() == pytest.approx(want, abs=1e-12)


def test_window_attention_mask_matches_the_method_example():
    expected = torch.tensor([  # docs/method.md §3, N = 3, W = 2
        [1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(ref.window_attention_mask(3, 3, 2), expected)


def test_decode_reference_with_ragged_lengths_and_gqa():
    batch, max_len, new_rows, heads, kv_heads, dim, n_commit = 3, 9, 3, 4, 2, 4, 2
    lengths = [0, 4, 7]
    q = torch.randn(batch, new_rows, heads, dim, dtype=torch.float64)
    k_new, v_new = (torch.randn(batch, new_rows, kv_heads, dim, dtype=torch.float64) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, max_len, kv_heads, dim, dtype=torch.float64) for _ in range(2))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    got = ref.window_attention_decode(q, k_new, v_new, k_cache, v_cache,
                                      torch.tensor(lengths, dtype=torch.int32), n_commit)
    for b, length in enumerate(lengths):
        for j in range(new_rows):
            for h in range(heads):
                hk = h // (heads // kv_heads)
                keys = [k_before[b, i, hk].tolist() for i in range(length)] + [k_new[b, i, hk].tolist()
                                                                                for i in range(j + 1)]
                values = [v_before[b, i, hk].tolist() for i in range(length)] + [v_new[b, i, hk].tolist()
                                                                                  for i in range(j + 1)]
                want = naive_attention_row(q[b, j, h].tolist(), keys, values, dim ** -0.5)
                assert got[b, j, h].tolist() == pytest.approx(want, abs=1e-12)
        assert torch.equal(k_cache[b, length:length + n_commit], k_new[b, :n_commit])
        assert torch.equal(k_cache[b, length + n_commit:], k_before[b, length + n_commit:])
        assert torch.equal(v_cache[b, :length], v_before[b, :length])


def test_noise_embedding_reference():
    rows, freqs, hidden = 5, 3, 4
    u = torch.rand(rows, dtype=torch.float64)
    tau = torch.rand(rows, dtype=torch.float64)
    weight = torch.randn(hidden, 4 * freqs, dtype=torch.float64)
    bias = torch.randn(hidden, dtype=torch.float64)
    got = ref.noise_embedding(u, tau, weight, bias)
    for m in range(rows):
        f = [10000 ** (-j / freqs) for j in range(freqs)]
        x, t = u[m].item(), tau[m].item()
        features = ([math.cos(2 * math.pi * x * fj) for fj in f] + [math.sin(2 * math.pi * x * fj) for fj in f]
                    + [math.cos(2 * math.pi * t * fj) for fj in f] + [math.sin(2 * math.pi * t * fj) for fj in f])
        want = [sum(w * a for w, a in zip(weight[n].tolist(), features)) + bias[n].item() for n in range(hidden)]
        assert got[m].tolist() == pytest.approx(want, abs=1e-12)


def naive_dyadic_features(x, freqs):
    """cos/sin(2 pi 2^j x) with the phase taken exactly by Fraction arithmetic."""
    phases = [float((Fraction(x) * 2 ** j) % 1) for j in range(freqs)]
    return [math.cos(2 * math.pi * p) for p in phases] + [math.sin(2 * math.pi * p) for p in phases]


def naive_binary_features(x, freqs):
    """Digits of x's binary expansion by repeated doubling (1 = 0.111..._2), as 2 d - 1."""
    if x == 1.0:
        return [1.0] * (2 * freqs)
    digits, rest = [], Fraction(x)
    for _ in range(2 * freqs):
        rest *= 2
        digits.append(1.0 if rest >= 1 else -1.0)
        rest -= int(rest)
    return digits


@pytest.mark.parametrize("code,naive", [("dyadic", naive_dyadic_features), ("binary", naive_binary_features)])
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.float64])
def test_noise_codes_reference(code, naive, u_dtype):
    rows, freqs = 8, 30
    u = torch.rand(rows, dtype=u_dtype)
    u[:4] = torch.tensor([0.0, 1.0, 0.5 - 2.0 ** -40, 0.1])
    got = ref.noise_features(u, 0.7, freqs, code)
    for m in range(rows):
        x = u[m].item()  # the input value: fp32 values are exact in a Python float
        tau = [2 * math.pi * 0.7 * 10000 ** (-j / freqs) for j in range(freqs)]
        want = naive(x, freqs) + [math.cos(a) for a in tau] + [math.sin(a) for a in tau]
        assert got[m].tolist() == pytest.approx(want, abs=1e-12)


def naive_sample(row, u, temperature, top_k, top_p, order="vocab"):
    """The rule of kforcing/sampling.h, with Python floats and sorted lists."""
    z = [x / temperature for x in row]
    if 0 < top_k < len(z):
        kth = sorted(z, reverse=True)[top_k - 1]
        z = [x if x >= kth else -math.inf for x in z]
    top = max(z)
    p = [math.exp(x - top) for x in z]
    total = sum(p)
    p = [x / total for x in p]
    if top_p < 1:
        # a token survives when the mass of strictly larger logits is below top_p
        p = [pv if sum(pw for pw, zw in zip(p, z) if zw > zv) < top_p else 0.0 for pv, zv in zip(p, z)]
        total = sum(p)
        p = [x / total for x in p]
    walk = list(range(len(p)))
    if order == "descending":  # larger logits first, equal logits by smaller id
        walk.sort(key=lambda v: (-row[v], v))
    cumulative = 0.0
    for v in walk:
        cumulative += p[v]
        if p[v] > 0 and cumulative >= u:
            return v
    return [v for v in walk if p[v] > 0][-1]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.7)])
@pytest.mark.parametrize("order", ["vocab", "descending"])
def test_sampler_reference(top_k, top_p, order):
    logits = torch.randn(200, 9, dtype=torch.float64)
    logits[::7, 2] = -math.inf
    logits[1::5, :3] = logits[1::5, :3].round()  # some ties
    u = torch.rand(200, dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0
    got = ref.inverse_cdf_sample(logits, u, 0.8, top_k, top_p, order).tolist()
    want = [naive_sample(row, x, 0.8, top_k, top_p, order) for row, x in zip(logits.tolist(), u.tolist())]
    assert got == want
