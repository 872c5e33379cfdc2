"""inverse_cdf_sample: batched inverse-CDF sampling from explicit uniforms."""

import torch

from . import _checks, _ext, reference


def inverse_cdf_sample(logits, u, temperature=1.0, top_k=0, top_p=1.0, order="vocab"):
    """Draw one token per row by inverse CDF from an explicit uniform: a pure function of (logits, u).

    Args:
        logits: (N, V) float32, bfloat16 or float16, any strides; float64 on CPU too (sampled in float64: an exact
            float64 CDF; on CUDA float64 logits raise TypeError).
        u: (N,) float32 or float64 in [0, 1]: one uniform per row.
        temperature: a positive finite float, or an (N,) float32/float64 tensor with one temperature per row.
        top_k: keep only the top_k largest logits (every logit equal to the k-th is kept too); 0 disables.
        top_p: then keep the nucleus: a token survives when the (renormalised) mass of strictly larger logits
            is < top_p, so the smallest set of most likely tokens reaching top_p survives, ties included;
            1.0 disables.
        order: the order in which the CDF walks the support: "vocab" (default), token ids 0..V-1; or
            "descending", by descending probability (descending logit), equal logits by smaller id first. Both
            sample the same distribution exactly; they differ in which token a given u maps to ("descending"
            puts the likely tokens at small u, so nearby uniforms tend to draw the same likely token).

    Returns:
        (N,) int64 token ids.

    The rule: p = softmax(logits * inv_t) with inv_t = min(1 / temperature, F), F the largest finite value of the
    compute type (float32, about 3.4e38; float64 for float64 logits), restricted and renormalised as above. The
    support is the finite logits the filters keep; the token is the first support token v, in the walk order,
    whose running mass (p_v plus the p of the tokens before it) is >= u. So u = 0 gives the first support token
    and u = 1 the last (also where rounding leaves u above the total mass); -inf and filtered-out logits are never
    returned.

    Extreme temperatures follow the same rule: a tiny temperature (1 / T above F, i.e. T below about 2.9e-39
    for float32) samples as T = 1 / F, which keeps only the largest logit and its ties unless logits differ by
    less than about 1e-37; a huge one (inv_t rounding to 0) makes every support token equally likely. top-k and
    top-p rank the logits themselves, so they keep their meaning at any temperature.

    The result is monotone in u and deterministic, and equals a float64 computation of the rule unless u lies
    within about 1e-7 (relative) of a CDF boundary: exponentials are float32, every sum is float64 (float64
    logits: within about 1e-15).

    Invalid rows (a NaN or +inf logit, no finite logit, u outside [0, 1], a temperature that is not positive
    and finite) raise ValueError on CPU. On CUDA, where raising would need a host sync, such rows return -1;
    check them with `raise_on_invalid_samples(tokens)` when you can afford the sync. No row is ever read outside
    its own elements.

    On CUDA the op makes no host sync and allocates only from PyTorch's caching allocator, so it can be
    captured in a CUDA graph.
    """
    temperatures, temperature_value = (
        (temperature, 1.0) if isinstance(temperature, torch.Tensor) else (None, float(temperature)))
    _checks.choice(order, _checks.CDF_ORDERS, "inverse_cdf_sample", "order")
    if _ext.use_kernel("inverse_cdf_sample", logits.device):
        return torch.ops.kforcing.inverse_cdf_sample(logits, u, temperatures, temperature_value, top_k, top_p,
                                                     order)
    return reference.inverse_cdf_sample(logits, u, temperature, top_k, top_p, order)


def sampling_probabilities(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution `inverse_cdf_sample(logits, u, temperature, top_k, top_p)` samples from, as float64 (R, V)
    probabilities (pure PyTorch): softmax(logits / temperature) on the top-k / top-p support, renormalised, with the
    sampler's rules for ties and extreme temperatures. For rules that need probabilities rather than samples, such as
    speculative sampling's acceptance test."""
    return reference.sampling_probabilities(logits, temperature, top_k, top_p)


def cdf_interval(logits, tokens, temperature=1.0, top_k=0, top_p=1.0, order="vocab"):
    """The float64 interval (lower, upper] of u that `inverse_cdf_sample(logits, u, temperature, top_k, top_p,
    order)` maps to each row's token, for tokens (R,) int64 inside their rows' sampling support (pure PyTorch).
    For rules that move a uniform inside its token's interval, such as boundary weighting in training."""
    return reference.cdf_interval(logits, tokens, temperature, top_k, top_p, order)


def raise_on_invalid_samples(tokens):
    """Raise ValueError if any row was invalid (token -1, the CUDA kernel's error value). Syncs with the host."""
    bad = (tokens < 0).nonzero().flatten()
    if bad.numel():
        rows = bad[:8].tolist()
        raise ValueError(
            f"kforcing.inverse_cdf_sample: {bad.numel()} invalid row(s), first {rows}: a NaN or +inf logit, no "
            "finite logit, u outside [0, 1], or a temperature that is not positive and finite")


@torch.library.register_fake("kforcing::inverse_cdf_sample")
def _inverse_cdf_sample_fake(logits, u, temperatures, temperature, top_k, top_p, order="vocab"):
    _checks.inverse_cdf_sample(logits, u, temperatures, temperature, top_k, top_p, order=order)
    return logits.new_empty(logits.shape[0], dtype=torch.long)
