"""Pure-PyTorch references of every kforcing op: same signatures as the public functions, same semantics.

They define what the kernels compute, stand in for a kernel that a build lacks, and are the baselines of
the benchmarks. They favour clarity over speed: the attention references build the dense boolean mask and
call SDPA, as the public K-Forcing release does.
"""

import math

import torch
import torch.nn.functional as F

from . import _checks

# ---------------------------------------------------------------------------------------------------------
# inverse_cdf_sample


def inverse_cdf_sample(logits, u, temperature=1.0, top_k=0, top_p=1.0, order="vocab"):
    """Float64 reference of kforcing_ops.inverse_cdf_sample (softmax + cumsum + searchsorted).

    order="descending" first stable-sorts each row by descending logit (so by descending probability, equal
    logits by smaller id), and walks the CDF in that order.
    """
    walk, cdf, support = _cdf_walk(logits, u, temperature, top_k, top_p, order)
    u = u.double()
    _checks.value(bool(((u >= 0) & (u <= 1)).all()), "inverse_cdf_sample", "`u` must lie in [0, 1]")
    vocab = cdf.shape[1]
    tokens = torch.searchsorted(cdf, u[:, None]).squeeze(1)
    first_support = support.int().argmax(dim=1)
    last_support = vocab - 1 - support.flip(1).int().argmax(dim=1)
    # u = 0 would land on a leading zero-probability token; u = 1 may meet the rounded total mass early, and u
    # above it lands past the end.
    tokens = torch.where(u == 0, first_support, torch.where(u == 1, last_support, tokens))
    return walk.gather(1, torch.minimum(tokens, last_support)[:, None]).squeeze(1)


def cdf_interval(logits, tokens, temperature=1.0, top_k=0, top_p=1.0, order="vocab"):
    """The float64 interval (lower, upper] of u that `inverse_cdf_sample` maps to each row's token.

    Args:
        logits: (R, V), as for inverse_cdf_sample, with the same temperature, top_k, top_p and order.
        tokens: (R,) int64 token ids, each inside its row's sampling support.

    Returns:
        (lower, upper): (R,) float64 each: the CDF just before the token in the walk order, and at it. Any u
        strictly inside maps to the token, in this reference and (up to the kernels' float32 rounding of the CDF,
        about 1e-7) in the kernels.
    """
    walk, cdf, support = _cdf_walk(logits, None, temperature, top_k, top_p, order)
    _checks.value(tokens.shape == (cdf.shape[0],) and tokens.dtype == torch.int64, "cdf_interval",
                  f"`tokens` must be int64 of shape ({cdf.shape[0]},), got {tokens.dtype} {tuple(tokens.shape)}")
    position = (walk == tokens[:, None].to(walk.device)).int().argmax(dim=1)
    _checks.value(bool(support.gather(1, position[:, None]).all()), "cdf_interval",
                  "every token must lie in its row's sampling support (top-k/top-p keep it, its logit is finite)")
    upper = cdf.gather(1, position[:, None]).squeeze(1)
    lower = torch.where(position > 0, cdf.gather(1, (position - 1).clamp(min=0)[:, None]).squeeze(1),
                        torch.zeros_like(upper))
    return lower, upper


def sampling_probabilities(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The float64 distribution (R, V) that `inverse_cdf_sample` draws each row's token from: softmax(logits / T)
    restricted to the top-k / top-p support and renormalised (the same rule, ties and clamps as the sampler)."""
    _, cdf, _ = _cdf_walk(logits, None, temperature, top_k, top_p, "vocab")
    return torch.diff(cdf, dim=1, prepend=torch.zeros_like(cdf[:, :1]))


def _cdf_walk(logits, u, temperature, top_k, top_p, order):
    """(walk, cdf, support) of each row: the token ids in walk order, the float64 CDF along it, and which
    positions of the walk hold a token of the sampling support (every finite surviving logit has p > 0, even
    where float64 rounds it to 0). `u` is only checked (None: not given)."""
    temperatures = temperature if isinstance(temperature, torch.Tensor) else None
    _checks.inverse_cdf_sample(logits, u, temperatures, 1.0 if temperatures is not None else temperature,
                               top_k, top_p, logits_types=_checks.FLOAT_TYPES + (torch.float64,), order=order)
    op = "inverse_cdf_sample"
    t = (temperatures.double() if temperatures is not None
         else torch.full((logits.shape[0],), float(temperature), dtype=torch.float64, device=logits.device))
    _checks.value(bool(((t > 0) & torch.isfinite(t)).all()), op, "`temperature` must be positive and finite")
    # 1 / T, clamped to the largest finite value of the kernels' compute type (fp32; fp64 for fp64 logits).
    inv_t = (1.0 / t).clamp(max=torch.finfo(torch.float64 if logits.dtype == torch.float64 else torch.float32).max)
    x = logits.double()
    _checks.value(not bool((torch.isnan(x) | (x == math.inf)).any()), op, "`logits` contains NaN or +inf")
    _checks.value(bool((x > -math.inf).any(dim=1).all()), op, "a row of `logits` has no finite logit")
    # z = (x - max) * inv_t as the kernels form it: the difference clamped to the compute type's lowest value, and
    # -inf logits kept at -inf (they never meet a zero inv_t).
    lowest = torch.finfo(torch.float64 if logits.dtype == torch.float64 else torch.float32).min
    shifted = (x - x.amax(dim=1, keepdim=True)).clamp(min=lowest)
    z = torch.where(x > -math.inf, shifted * inv_t[:, None], -math.inf)
    vocab = z.shape[1]
    if 0 < top_k < vocab:  # the filters rank the logits themselves (z may tie them when inv_t is 0)
        kth = x.topk(top_k, dim=1).values[:, -1:]
        z = z.masked_fill(x < kth, -math.inf)  # ties at the k-th value survive
    if top_p < 1.0:
        z = z.masked_fill(~_nucleus(z, top_p, rank=torch.where(z > -math.inf, x, -math.inf)), -math.inf)
    p = torch.softmax(z, dim=1)
    # The walk order: positions of the CDF -> token ids (the support first; -inf logits have p = 0).
    walk = (torch.sort(torch.where(z > -math.inf, x, -math.inf), dim=1, descending=True, stable=True).indices
            if order == "descending" else torch.arange(vocab, device=x.device).expand(x.shape[0], vocab))
    return walk, p.gather(1, walk).cumsum(dim=1), z.gather(1, walk) > -math.inf


def _nucleus(z, top_p, rank=None):
    """Tokens whose strictly larger logits hold < top_p of the mass (ties kept together).

    z: the scaled logits (their softmax is the mass); rank: the values that order and tie the tokens, default z.
    """
    rank = z if rank is None else rank
    # Unnormalised weights summed in descending order against top_p * total, as the kernels do: a uniform
    # distribution (a huge temperature) then sums exactly, with no rounding at the boundary.
    weight = torch.exp(z - z.amax(dim=1, keepdim=True))
    sorted_rank, order = rank.sort(dim=1, descending=True)
    sorted_weight = weight.gather(1, order)
    above = torch.cat([torch.zeros_like(sorted_weight[:, :1]), sorted_weight.cumsum(dim=1)[:, :-1]], dim=1)
    first_of_tie = torch.searchsorted(-sorted_rank, -sorted_rank)  # first index of each value's tie group
    keep_sorted = above.gather(1, first_of_tie) < top_p * weight.sum(dim=1, keepdim=True)
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


# ---------------------------------------------------------------------------------------------------------
# window attention


def window_attention_mask(num_context, num_windows, window_size, device=None):
    """The (S, S) boolean staircase mask of docs/method.md §3 (True = may attend).

    Rows/keys 0..N-1 are context, then num_windows windows of window_size hint rows; window t is anchored at
    context row t. Context row s sees context 0..s. Hint row (t, i) sees context 0..t and hints (t, 0..i).
    """
    pos = torch.arange(num_context + num_windows * window_size, device=device)
    is_context = pos < num_context
    window = torch.where(is_context, -1, (pos - num_context) // window_size)
    offset = torch.where(is_context, -1, (pos - num_context) % window_size)
    last_context = torch.where(is_context, pos, window)  # the last context key a row may see
    sees_context = is_context[None, :] & (pos[None, :] <= last_context[:, None])
    sees_hint = (~is_context[:, None]) & (~is_context[None, :]) & (window[:, None] == window[None, :]) & (
        offset[None, :] <= offset[:, None])
    return sees_context | sees_hint


def _sdpa(q, k, v, mask, scale):
    """q (B, S, H, D), k/v (B, S_kv, H_kv, D), mask broadcastable to (B, H, S, S_kv)."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def window_attention(q, k, v, num_windows, window_size, scale=None):
    """Reference of kforcing_ops.window_attention: the dense staircase mask + SDPA."""
    _checks.window_attention(q, k, v, num_windows, window_size, dtypes=_checks.ALL_ATTENTION_TYPES)
    scale = q.shape[-1] ** -0.5 if scale is None else scale  # head_dim >= 1 was checked
    context = q.shape[1] - num_windows * window_size
    mask = window_attention_mask(context, num_windows, window_size, device=q.device)
    return _sdpa(q, k, v, mask, scale)


def window_attention_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit, scale=None):
    """Reference of kforcing_ops.window_attention_decode: cat + masked SDPA, then the in-place cache write."""
    _checks.window_attention_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit,
                                    dtypes=_checks.ALL_ATTENTION_TYPES)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, new_rows = q.shape[:2]
    max_len = k_cache.shape[1]
    lengths = cache_seqlens.long()
    _checks.value(bool(((lengths >= 0) & (lengths + n_commit <= max_len)).all()), "window_attention_decode",
                  f"cache overflow: every cache_seqlens[b] + n_commit ({n_commit}) must be <= L_max ({max_len})")
    keys = torch.arange(max_len + new_rows, device=q.device)
    rows = torch.arange(new_rows, device=q.device)
    sees_cache = (keys[None, None, :] < lengths[:, None, None]) & (keys < max_len)
    sees_new = (keys[None, :] - max_len >= 0) & (keys[None, :] - max_len <= rows[:, None])
    mask = (sees_cache | sees_new[None]).unsqueeze(1)  # (B, 1, T, L_max + T)
    out = _sdpa(q, torch.cat([k_cache, k_new], dim=1), torch.cat([v_cache, v_new], dim=1), mask, scale)
    if n_commit > 0:
        slots = (lengths[:, None] + torch.arange(n_commit, device=q.device))[:, :, None, None]
        slots = slots.expand(batch, n_commit, *k_cache.shape[2:])
        k_cache.scatter_(1, slots, k_new[:, :n_commit])
        v_cache.scatter_(1, slots, v_new[:, :n_commit])
    return out


# ---------------------------------------------------------------------------------------------------------
# noise embedding


def noise_frequencies(num_freqs, device=None):
    """f_j = 10000^(-j/F), j = 0..F-1, in float64."""
    return 10000.0 ** (-torch.arange(num_freqs, dtype=torch.float64, device=device) / num_freqs)


def _times_power_of_two(u, k):
    """u * 2^k (u float64 in [0, 1], k >= 0 an integer tensor) without rounding: two exact power-of-two steps, so
    no intermediate overflows for k up to about 1000 (the result may be inf, which is even: `u` has no such digit)."""
    half = k // 2
    return u * torch.exp2(half.double()) * torch.exp2((k - half).double())


def _dyadic_phase(u, num_freqs):
    """frac(u 2^j), j = 0..F-1, exactly: (M, F) float64. u 2^j >= 2^53 is an even integer, phase 0."""
    x = _times_power_of_two(u[:, None], torch.arange(num_freqs, device=u.device))
    return torch.where(x < 2.0 ** 53, x - x.floor(), 0.0)


def _binary_digits(u, count):
    """Digits d_1..d_count of u's binary expansion (d_k = floor(u 2^k) mod 2; all 1 for u = 1): (M, count)."""
    x = _times_power_of_two(u[:, None], torch.arange(1, count + 1, device=u.device))
    digits = torch.where(x < 2.0 ** 53, x.floor().remainder(2.0), 0.0)  # above 2^53 every float64 is even
    return torch.where(u[:, None] == 1.0, 1.0, digits)


def noise_features(u, tau, num_freqs, code="sinusoid"):
    """[u features (2F), cos(2 pi tau f), sin(2 pi tau f)]: (M, 4F) in float64.

    u's features by `code`: "sinusoid" cos/sin(2 pi u f); "dyadic" cos/sin(2 pi frac(u 2^j)); "binary" 2 d_k - 1,
    k = 1..2F (see kforcing_ops.noise_embedding). float32 u converts to float64 exactly, so the digits and phases
    are those of the input value.
    """
    f = noise_frequencies(num_freqs, device=u.device)
    tau = tau.double() if isinstance(tau, torch.Tensor) else torch.full_like(u, tau, dtype=torch.float64)
    u = u.double()
    angle_tau = 2 * math.pi * tau[:, None] * f
    if code == "binary":
        u_features = 2.0 * _binary_digits(u, 2 * num_freqs) - 1.0
    else:
        angle_u = 2 * math.pi * (_dyadic_phase(u, num_freqs) if code == "dyadic" else u[:, None] * f)
        u_features = torch.cat([angle_u.cos(), angle_u.sin()], dim=1)
    return torch.cat([u_features, angle_tau.cos(), angle_tau.sin()], dim=1)


def noise_embedding(u, tau, weight, bias=None, code="sinusoid"):
    """Reference of kforcing_ops.noise_embedding: float64 features, then a Linear in weight's dtype."""
    tau_tensor = tau if isinstance(tau, torch.Tensor) else None
    _checks.noise_embedding(u, tau_tensor, weight, bias, tau_scalar=None if tau_tensor is not None else float(tau),
                            code=code)
    if tau_tensor is not None:
        _checks.tau_values(tau_tensor, "noise_embedding")
    _checks.value(bool(((u >= 0) & (u <= 1)).all()), "noise_embedding", "`u` must lie in [0, 1]")
    features = noise_features(u.detach(), tau.detach() if tau_tensor is not None else tau, weight.shape[1] // 4,
                              code)
    return F.linear(features.to(weight.dtype), weight, bias)


def noise_conditioned_embedding(token_ids, token_table, u, tau, weight, bias=None, code="sinusoid"):
    """Reference of kforcing_ops.noise_conditioned_embedding: cat(token_table[token_ids], noise embeddings)."""
    tau_tensor = tau if isinstance(tau, torch.Tensor) else None
    _checks.noise_conditioned_embedding(token_ids, token_table, u, tau_tensor, weight, bias,
                                        tau_scalar=None if tau_tensor is not None else float(tau), code=code)
    if tau_tensor is not None:
        _checks.tau_values(tau_tensor, "noise_conditioned_embedding")
    _checks.value(bool(((token_ids >= 0) & (token_ids < token_table.shape[0])).all()), "noise_conditioned_embedding",
                  f"`token_ids` must lie in [0, V={token_table.shape[0]})")
    batch, hints = u.shape
    if isinstance(tau, torch.Tensor):  # a 0-d tensor is every sequence's tau
        tau = (tau.reshape(1).expand(batch) if tau.dim() == 0 else tau)[:, None].expand(batch, hints).reshape(-1)
    noise = noise_embedding(u.reshape(-1), tau, weight, bias, code).view(batch, hints, weight.shape[0])
    return torch.cat([F.embedding(token_ids, token_table), noise], dim=1)


def decode_linear(x, weight, bias=None):
    """y = x @ weight^T + bias, computed in fp32 from the fp32 values of x, weight and bias; x's dtype out."""
    _checks.decode_linear(x, weight, bias)
    y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)
