"""window_attention (training staircase) and window_attention_decode (KV-cache decode step)."""

import torch

from . import _checks, _ext, reference


def window_attention(q, k, v, num_windows, window_size, scale=None):
    """Block-causal attention over [N context rows | num_windows windows of window_size hint rows].

    Args:
        q: (B, S, H, D); k, v: (B, S, H_kv, D) with H_kv dividing H (GQA). S = N + num_windows * window_size.
        num_windows: windows of hint rows, 0 <= num_windows <= N; window t is anchored at context row t.
        window_size: hint rows per window (k in K-Forcing; 2k with token rows first for self-forcing).
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        (B, S, H, D) in q's dtype.

    Mask (METHOD.md section 3): context row s attends to context rows 0..s; hint row i of window t attends to
    context rows 0..t and hint rows 0..i of its own window, and never to other windows. Differentiable in
    q, k and v.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _ext.use_kernel("window_attention", q.device):
        return torch.ops.kforcing.window_attention(q, k, v, num_windows, window_size, scale)[0]
    return reference.window_attention(q, k, v, num_windows, window_size, scale)


def window_attention_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit, scale=None):
    """One decode step: T new rows per sequence attend to their cache and causally to each other.

    Args:
        q: (B, T, H, D); k_new, v_new: (B, T, H_kv, D). The first n_commit rows are real (committed) tokens,
            the rest hints.
        k_cache, v_cache: (B, L_max, H_kv, D), preallocated; modified in place.
        cache_seqlens: (B,) int32, the number of valid cache rows of each sequence (ragged batches).
        n_commit: how many of the new rows to append to the cache, 0 <= n_commit <= T.
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        (B, T, H, D) in q's dtype.

    New row j of sequence b attends to k_cache[b, :len_b] and new rows 0..j. The first n_commit new K/V rows
    are then written to the caches at [len_b, len_b + n_commit); hint rows are used but never written, and
    rows beyond len_b + n_commit are untouched. cache_seqlens is not modified: advance it yourself
    (cache_seqlens += n_commit). len_b + n_commit must not exceed L_max. Inference only (no autograd).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _ext.use_kernel("window_attention_decode", q.device):
        return torch.ops.kforcing.window_attention_decode(
            q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit, scale)
    return reference.window_attention_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit, scale)


@torch.library.register_fake("kforcing::window_attention")
def _window_attention_fake(q, k, v, num_windows, window_size, scale):
    _checks.window_attention(q, k, v, num_windows, window_size)
    batch, seq, heads, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty((batch, heads, seq), dtype=lse_dtype)


@torch.library.register_fake("kforcing::window_attention_backward")
def _window_attention_backward_fake(grad_out, q, k, v, out, lse, num_windows, window_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("kforcing::window_attention_decode")
def _window_attention_decode_fake(q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit, scale):
    _checks.window_attention_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit)
    return torch.empty_like(q)


def _setup_context(ctx, inputs, output):
    q, k, v, num_windows, window_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.window = (num_windows, window_size, scale)


def _backward(ctx, grad_out, _grad_lse):
    # lse is an internal output of the op (the public function drops it), so it receives no gradient.
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.kforcing.window_attention_backward(grad_out, q, k, v, out, lse, *ctx.window)
    return grad_q, grad_k, grad_v, None, None, None


torch.library.register_autograd("kforcing::window_attention", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("kforcing.window_attention: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("kforcing::window_attention_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
