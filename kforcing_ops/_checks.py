"""Argument checks for the fake kernels and the references, mirroring csrc/include/kforcing/*.h.

The C++ kernels run their own checks in eager mode; these run when tracing (fake tensors) and in the
references, so every path rejects bad input with the same message: the op, the argument, what was expected.
Shape and value problems raise ValueError, dtype problems TypeError.
"""

import torch

FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
UNIFORM_TYPES = (torch.float32, torch.float64)
# The attention kernels: fp64 on CPU (for gradcheck), fp16 on CUDA; the references take all four.
ATTENTION_TYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float64), "cuda": FLOAT_TYPES}
ALL_ATTENTION_TYPES = FLOAT_TYPES + (torch.float64,)


def _name(dtype):
    return str(dtype).replace("torch.", "")


def value(cond, op, message):
    if cond is True:  # a plain bool that holds: torch 2.11's dynamo cannot trace a lazy message next to a constant
        return
    torch._check_value(cond, lambda: f"kforcing.{op}: {message}")


def check_type(cond, message):
    """torch._check_type, skipped when cond is a plain True (see value)."""
    if cond is not True:
        torch._check_type(cond, message)


def dim(t, ndim, op, name, layout):
    value(t.dim() == ndim, op, f"`{name}` must be {ndim}-D {layout}, got shape {list(t.shape)}")


def size(t, d, expected, op, name, what):
    value(t.shape[d] == expected, op,
          f"`{name}` must have size {expected} in dim {d} ({what}), got shape {list(t.shape)}")


def dtype(t, allowed, op, name):
    names = ", ".join(map(_name, allowed))
    check_type(t.dtype in allowed,
                      lambda: f"kforcing.{op}: `{name}` must have dtype in {{{names}}}, got {_name(t.dtype)}")


def same_device(t, ref, op, name, ref_name):
    value(t.device == ref.device, op,
          f"`{name}` is on {t.device} but `{ref_name}` is on {ref.device}; all tensors must be on one device")


NOISE_CODES = ("sinusoid", "dyadic", "binary")
CDF_ORDERS = ("vocab", "descending")


def choice(given, choices, op, name):
    """A string option: one of `choices` (ValueError naming the argument and the choices)."""
    value(given in choices, op, f"`{name}` must be one of {', '.join(map(repr, choices))}, got {given!r}")


# The sampler kernels: float64 logits on CPU only (sampled in float64); the reference takes all four anywhere.
SAMPLER_TYPES = {"cpu": FLOAT_TYPES + (torch.float64,), "cuda": FLOAT_TYPES}


def inverse_cdf_sample(logits, u, temperatures, temperature, top_k, top_p, logits_types=None, order="vocab"):
    """`logits_types`: default, what the kernel for logits' device takes; the reference passes all four."""
    op = "inverse_cdf_sample"
    choice(order, CDF_ORDERS, op, "order")
    dim(logits, 2, op, "logits", "(N, V)")
    if logits_types is None:
        check_type(logits.dtype != torch.float64 or logits.device.type == "cpu", lambda: (
            f"kforcing.{op}: `logits` of dtype float64 are sampled on CPU only; on {logits.device} pass float32, "
            "bfloat16 or float16 logits"))
        logits_types = SAMPLER_TYPES.get(logits.device.type, FLOAT_TYPES + (torch.float64,))
    dtype(logits, logits_types, op, "logits")
    value(logits.shape[1] >= 1, op, f"`logits` needs at least one vocabulary column, got shape {list(logits.shape)}")
    if u is not None:  # None: a caller that walks the CDF without sampling it (reference.cdf_interval)
        dim(u, 1, op, "u", "(N,)")
        size(u, 0, logits.shape[0], op, "u", "one uniform per row of logits")
        dtype(u, UNIFORM_TYPES, op, "u")
        same_device(u, logits, op, "u", "logits")
    if temperatures is not None:
        dim(temperatures, 1, op, "temperature", "(N,) when a tensor")
        size(temperatures, 0, logits.shape[0], op, "temperature", "one temperature per row of logits")
        dtype(temperatures, UNIFORM_TYPES, op, "temperature")
        same_device(temperatures, logits, op, "temperature", "logits")
    else:
        value(0.0 < temperature < float("inf"), op, f"`temperature` must be positive and finite, got {temperature}")
    value(top_k >= 0, op, f"`top_k` must be >= 0 (0 disables it), got {top_k}")
    value(0.0 < top_p <= 1.0, op, f"`top_p` must be in (0, 1] (1 disables it), got {top_p}")


def _heads(q, k, v, op, dtypes):
    """q (B, S, H, D) with k, v (B, S_kv, H_kv, D); H_kv divides H."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        dim(t, 4, op, name, "(batch, seq, heads, head_dim)")
    dtype(q, dtypes or ATTENTION_TYPES.get(q.device.type, ALL_ATTENTION_TYPES), op, "q")
    for name, t in (("k", k), ("v", v)):
        check_type(t.dtype == q.dtype,
                          lambda: f"kforcing.{op}: `{name}` has dtype {_name(t.dtype)} but `q` has {_name(q.dtype)}")
        same_device(t, q, op, name, "q")
    value(k.shape == v.shape, op, f"`k` and `v` must have one shape, got {list(k.shape)} and {list(v.shape)}")
    size(k, 0, q.shape[0], op, "k", "batch")
    size(k, 3, q.shape[3], op, "k", "head_dim, as q")
    value(k.shape[2] >= 1 and q.shape[2] % k.shape[2] == 0, op,
          f"the kv heads of `k` ({k.shape[2]}) must divide the heads of `q` ({q.shape[2]})")
    value(q.shape[3] >= 1, op, f"`q` must have head_dim >= 1, got shape {list(q.shape)}")


def window_attention(q, k, v, num_windows, window_size, dtypes=None):
    """`dtypes`: default, what the kernel for q's device takes; the reference passes ALL_ATTENTION_TYPES."""
    op = "window_attention"
    _heads(q, k, v, op, dtypes)
    size(k, 1, q.shape[1], op, "k", "seq, as q")
    value(window_size >= 1, op, f"`window_size` must be >= 1, got {window_size}")
    value(num_windows >= 0, op, f"`num_windows` must be >= 0, got {num_windows}")
    # The C++ rule, which cannot form num_windows * window_size (it may wrap around int64).
    seq = q.shape[1]
    fits = seq >= 1 and (num_windows == 0 or window_size <= (seq - 1) // num_windows)
    context = seq - num_windows * window_size if fits else 0
    value(fits and num_windows <= context, op,
          f"`q` has {q.shape[1]} rows, which must be N context rows + num_windows * window_size "
          f"({num_windows} * {window_size}) hint rows with 1 <= num_windows <= N")


def window_attention_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit, dtypes=None):
    op = "window_attention_decode"
    _heads(q, k_new, v_new, op, dtypes)
    value(q.shape[2] >= 1, op, f"`q` must have at least one head, got shape {list(q.shape)}")
    size(k_new, 1, q.shape[1], op, "k_new", "T new rows, as q")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        dim(t, 4, op, name, "(batch, max_len, kv_heads, head_dim)")
        check_type(t.dtype == q.dtype,
                          lambda: f"kforcing.{op}: `{name}` has dtype {_name(t.dtype)} but `q` has {_name(q.dtype)}")
        same_device(t, q, op, name, "q")
    value(k_cache.shape == v_cache.shape, op,
          f"`k_cache` and `v_cache` must have one shape, got {list(k_cache.shape)} and {list(v_cache.shape)}")
    size(k_cache, 0, q.shape[0], op, "k_cache", "batch")
    size(k_cache, 2, k_new.shape[2], op, "k_cache", "kv_heads, as k_new")
    size(k_cache, 3, q.shape[3], op, "k_cache", "head_dim, as q")
    dim(cache_seqlens, 1, op, "cache_seqlens", "(batch,)")
    size(cache_seqlens, 0, q.shape[0], op, "cache_seqlens", "one length per sequence")
    dtype(cache_seqlens, (torch.int32,), op, "cache_seqlens")
    same_device(cache_seqlens, q, op, "cache_seqlens", "q")
    value(0 <= n_commit <= q.shape[1], op, f"`n_commit` must be in [0, T={q.shape[1]}], got {n_commit}")
    value(k_cache.stride(3) == 1 and v_cache.stride(3) == 1, op,
          "`k_cache` and `v_cache` must be contiguous in head_dim (they are written in place)")
    value(non_overlapping(k_cache) and non_overlapping(v_cache), op,
          "`k_cache` and `v_cache` must not be expanded or otherwise overlap themselves (sequences and heads would "
          f"overwrite each other), got strides {list(k_cache.stride())} and {list(v_cache.stride())}")
    value(not may_share_memory(k_cache, v_cache), op, "`k_cache` and `v_cache` must not share memory")
    for name, t in (("k_new", k_new), ("v_new", v_new), ("q", q)):
        value(not (may_share_memory(t, k_cache) or may_share_memory(t, v_cache)), op,
              f"`{name}` must not share memory with `k_cache` or `v_cache`: the caches are written in place while "
              "it is read")


def non_overlapping(t):
    """No two elements share memory (the rule of is_non_overlapping in csrc/include/kforcing/checks.h)."""
    span = 0
    for stride, n in sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] > 1):
        if stride <= span:
            return False
        span += stride * (n - 1)
    return True


def may_share_memory(a, b):
    """One storage and intersecting byte ranges (may_share_memory in checks.h); reads no data."""
    if a.numel() == 0 or b.numel() == 0 or not torch._C._is_alias_of(a, b):
        return False

    def byte_range(t):
        last = t.storage_offset() + sum(t.stride(d) * (t.shape[d] - 1) for d in range(t.dim()))
        return t.storage_offset() * t.element_size(), (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    return a0 < b1 and b0 < a1


def tau_value(tau, op):
    """A scalar tau must be positive and finite (a tensor's values: tau_values, or NaN rows on CUDA)."""
    value(0.0 < tau < float("inf"), op, f"`tau` must be positive and finite, got {tau}")


def tau_values(tau, op):
    """Every value of a tau tensor positive and finite: reads the data (the references; the CPU kernels)."""
    tau = tau.reshape(-1)
    bad = ~((tau > 0) & torch.isfinite(tau))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        value(False, op, f"`tau` must be positive and finite; element {first} is {float(tau[first])}")


def noise_embedding(u, tau, weight, bias, tau_scalar=None, code="sinusoid"):
    """`tau`: the tensor, or None with the float in `tau_scalar` (None: not known, as in a backward)."""
    op = "noise_embedding"
    choice(code, NOISE_CODES, op, "code")
    dim(u, 1, op, "u", "(M,)")
    dtype(u, UNIFORM_TYPES, op, "u")
    if tau is None and tau_scalar is not None:
        tau_value(tau_scalar, op)
    if tau is not None:
        dim(tau, 1, op, "tau", "(M,) when a tensor")
        size(tau, 0, u.shape[0], op, "tau", "one temperature per row of u")
        dtype(tau, UNIFORM_TYPES, op, "tau")
        same_device(tau, u, op, "tau", "u")
    dim(weight, 2, op, "weight", "(H, 4F)")
    dtype(weight, FLOAT_TYPES + (torch.float64,), op, "weight")
    value(weight.shape[1] % 4 == 0 and weight.shape[1] > 0, op,
          f"`weight` must be (H, 4F): cos/sin features of u and of tau, F per part; got shape {list(weight.shape)}")
    same_device(weight, u, op, "weight", "u")
    if bias is not None:
        dim(bias, 1, op, "bias", "(H,)")
        size(bias, 0, weight.shape[0], op, "bias", "H, the rows of weight")
        check_type(bias.dtype == weight.dtype, lambda: (
            f"kforcing.{op}: `bias` has dtype {_name(bias.dtype)} but `weight` has {_name(weight.dtype)}"))
        same_device(bias, weight, op, "bias", "weight")


def noise_conditioned_embedding(token_ids, token_table, u, tau, weight, bias, tau_scalar=None, code="sinusoid"):
    """`tau`: the tensor, or None with the float in `tau_scalar`."""
    op = "noise_conditioned_embedding"
    choice(code, NOISE_CODES, op, "code")
    if tau is None and tau_scalar is not None:
        tau_value(tau_scalar, op)
    dim(token_ids, 2, op, "token_ids", "(B, Tc)")
    dtype(token_ids, (torch.int64, torch.int32), op, "token_ids")
    dim(token_table, 2, op, "token_table", "(V, H)")
    dtype(token_table, FLOAT_TYPES + (torch.float64,), op, "token_table")
    dim(u, 2, op, "u", "(B, Th)")
    dtype(u, UNIFORM_TYPES, op, "u")
    size(u, 0, token_ids.shape[0], op, "u", "batch, as token_ids")
    if tau is not None and tau.dim() == 1:
        size(tau, 0, u.shape[0], op, "tau", "one temperature per sequence")
    value(tau is None or tau.dim() <= 1, op, "`tau` must be a float, a 0-d tensor or a (B,) tensor")
    dim(weight, 2, op, "weight", "(H, 4F)")
    size(weight, 0, token_table.shape[1], op, "weight", "H, the width of token_table")
    check_type(weight.dtype == token_table.dtype, lambda: (
        f"kforcing.{op}: `weight` has dtype {_name(weight.dtype)} but `token_table` has {_name(token_table.dtype)}"))
    for name, t in (("token_table", token_table), ("u", u), ("weight", weight)):
        same_device(t, token_ids, op, name, "token_ids")


# decode_linear: fp32 or bf16 activations and weights, on CPU and CUDA alike.
LINEAR_TYPES = (torch.float32, torch.bfloat16)


def decode_linear(x, weight, bias):
    op = "decode_linear"
    value(x.dim() >= 1, op, "`x` must have at least 1 dim (..., in_features), got a 0-d tensor")
    dim(weight, 2, op, "weight", "(out_features, in_features)")
    dtype(x, LINEAR_TYPES, op, "x")
    dtype(weight, LINEAR_TYPES, op, "weight")
    same_device(weight, x, op, "weight", "x")
    value(x.shape[-1] == weight.shape[1], op,
          f"`x` must have in_features = weight.shape[1] = {weight.shape[1]} in its last dim, got shape "
          f"{list(x.shape)}")
    if bias is not None:
        dim(bias, 1, op, "bias", "(out_features,)")
        dtype(bias, LINEAR_TYPES, op, "bias")
        same_device(bias, x, op, "bias", "x")
        size(bias, 0, weight.shape[0], op, "bias", "out_features = weight.shape[0]")
