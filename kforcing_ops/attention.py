"""window_attention (training staircase) and window_attention_decode (KV-cache decode step)."""

import torch

from . import _checks, _ext, reference


def _scale(q, scale, op):
    """The softmax scale, default 1/sqrt(head_dim); a q without a head_dim >= 1 raises the op's error."""
    if scale is not None:
        return float(scale)
    _checks.dim(q, 4, op, "q", "(batch, seq, heads, head_dim)")
    _checks.value(q.shape[3] >= 1, op, f"`q` must have head_dim >= 1, got shape {list(q.shape)}")
    return q.shape[3] ** -0.5


def window_attention(q, k, v, num_windows, window_size, scale=None):
    """Block-causal attention over [N context rows | num_windows windows of window_size hint rows].

    Args:
        q: (B, S, H, D); k, v: (B, S, H_kv, D) with H_kv dividing H (GQA), D >= 1 (<= 256 on CUDA).
            S = N + num_windows * window_size with N >= 1 (checked without forming the product, so no value
            can wrap it around).
        num_windows: windows of hint rows, 0 <= num_windows <= N; window t is anchored at context row t.
        window_size: hint rows per window (k in K-Forcing; 2k with token rows first for self-forcing), any
            size >= 1: windows longer than a 64-key tile are tiled.
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        (B, S, H, D) in q's dtype.

    Mask (docs/method.md §3): context row s attends to context rows 0..s; hint row i of window t attends to
    context rows 0..t and hint rows 0..i of its own window, and never to other windows. Differentiable in
    q, k and v.
    """
    scale = _scale(q, scale, "window_attention")
    if _ext.use_kernel("window_attention", q.device):
        return torch.ops.kforcing.window_attention(q, k, v, num_windows, window_size, scale)[0]
    return reference.window_attention(q, k, v, num_windows, window_size, scale)


def window_attention_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, n_commit, scale=None):
    """One decode step: T new rows per sequence attend to their cache and causally to each other.

    Args:
        q: (B, T, H, D) with H >= 1 and D >= 1; k_new, v_new: (B, T, H_kv, D). The first n_commit rows are
            real (committed) tokens, the rest hints. On CUDA, D is limited by the GPU's shared memory (256 on
            sm_80 / sm_90, 158 on sm_86 / sm_89): a larger D raises ValueError.
        k_cache, v_cache: (B, L_max, H_kv, D), preallocated, contiguous in D; modified in place. Each must be
            its own memory (not expanded, not overlapping itself or the other cache), and q, k_new and v_new
            must not share memory with either; violations raise ValueError (checked from storage and strides,
            without reading data or syncing).
        cache_seqlens: (B,) int32, the number of valid cache rows of each sequence (ragged batches).
        n_commit: how many of the new rows to append to the cache, 0 <= n_commit <= T.
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        (B, T, H, D) in q's dtype.

    New row j of sequence b attends to k_cache[b, :len_b] and new rows 0..j. The first n_commit new K/V rows
    are then written to the caches at [len_b, len_b + n_commit); hint rows are used but never written, and
    rows beyond len_b + n_commit are untouched. cache_seqlens is not modified: advance it yourself
    (cache_seqlens += n_commit); it is read once, before any write. len_b + n_commit must not exceed L_max
    (ValueError on CPU; on CUDA that sequence's outputs are NaN and nothing is written). Inference only.
    """
    scale = _scale(q, scale, "window_attention_decode")
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
