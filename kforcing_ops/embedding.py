"""noise_embedding: the fused noise-conditioned embedding of K-Forcing's hint positions."""

import torch

from . import _checks, _ext, reference


def _reject_noise_grad(u, tau):
    for name, t in (("u", u), ("tau", tau)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"kforcing: `{name}` requires grad, but the noise embedding is not differentiable in "
                             f"its noise inputs; pass {name}.detach()")


def _split_tau(tau, rows):
    """(tensor or None, float) as the ops' schemas take tau; a 0-d tensor broadcasts to all `rows`."""
    if not isinstance(tau, torch.Tensor):
        return None, float(tau)
    return (tau.reshape(1).expand(rows) if tau.dim() == 0 else tau), 0.0


def noise_embedding(u, tau, weight, bias=None, code="sinusoid"):
    """Embed uniforms u (and temperatures tau) as sinusoidal features times a Linear layer, fused.

    Args:
        u: (M,) float32 or float64 in [0, 1].
        tau: a float, a 0-d tensor, or an (M,) float32/float64 tensor; every value positive and finite.
        weight: (H, 4F) float32, bfloat16 or float16; the output takes its dtype.
        bias: optional (H,) of weight's dtype.
        code: how u's half of the features encodes u (tau's half is always the sinusoids below):
            "sinusoid" (default): cos(2 pi u f), sin(2 pi u f) with f_j = 10000^(-j/F).
            "dyadic": cos(2 pi u 2^j), sin(2 pi u 2^j), j = 0..F-1: multi-resolution, the fastest feature tells
                apart neighbouring intervals of width 2^-(F-1). The phase frac(2^j u) is exact, so high
                frequencies lose no accuracy. 1-periodic in u: u = 1 encodes as u = 0.
            "binary": the 2F binary digits d_1..d_2F of u (d_k = floor(u 2^k) mod 2) as 2 d_k - 1 in {-1, +1};
                u = 1 takes the expansion 0.111..._2 (all +1), next to the uniforms just below 1. Digits are
                read from u's exact value, so they are the same in fp32 and fp64 and on every device.

    Returns:
        (M, H): [u features (2F), cos(2 pi tau f), sin(2 pi tau f)] @ weight.T + bias, with f_j = 10000^(-j/F),
        j = 0..F-1; under the default code, [cos(2 pi u f), sin(2 pi u f), cos(2 pi tau f), sin(2 pi tau f)].
        Features are computed in fp32 or better, so an angle 2 pi x f carries an absolute error of about
        1e-7 * x: keep tau to temperature-like magnitudes.

    Differentiable in weight and bias (the weight columns of every code, tau's included). u and tau are noise:
    they get no gradient, and passing one that requires grad raises ValueError rather than silently dropping its
    gradient (under "binary" the derivative in u would be zero almost everywhere anyway). u outside [0, 1], or a tau
    that is not positive and finite, raises ValueError on CPU; on CUDA (no host sync) such a row is NaN (a
    scalar tau is checked on the host and raises everywhere).
    """
    _checks.choice(code, _checks.NOISE_CODES, "noise_embedding", "code")
    _reject_noise_grad(u, tau)
    tau_tensor, tau_value = _split_tau(tau, u.shape[0])
    if _ext.use_kernel("noise_embedding", u.device):
        return torch.ops.kforcing.noise_embedding(u, tau_tensor, tau_value, weight, bias, code)
    return reference.noise_embedding(u, tau_tensor if tau_tensor is not None else tau_value, weight, bias, code)


def noise_conditioned_embedding(token_ids, token_table, u, tau, weight, bias=None, code="sinusoid"):
    """The model's input sequence in one call: token embeddings, then noise embeddings.

    Args:
        token_ids: (B, Tc) int64 or int32, each in [0, V).
        token_table: (V, H), the token embedding table; float32, bfloat16 or float16.
        u: (B, Th) float32 or float64 in [0, 1]: the uniforms of the hint rows.
        tau: a float, a 0-d tensor, or a (B,) tensor: one temperature per sequence, positive and finite.
        weight, bias: (H, 4F) and optional (H,), as in `noise_embedding`, of token_table's dtype.
        code: u's features, "sinusoid" (default), "dyadic" or "binary", as in `noise_embedding`.

    Returns:
        (B, Tc + Th, H): rows 0..Tc-1 are token_table[token_ids], rows Tc.. are noise_embedding(u, tau)
        (before the residual MLP, which the model applies). This builds [context | all windows] in training and
        [committed | hints] in decoding without a cat. Differentiable in token_table, weight and bias.

    An id outside [0, V) raises ValueError on CPU; on CUDA (no host sync) its row is NaN, and no memory outside
    token_table is read. The same holds for u outside [0, 1], and for a per-sequence tau that is not positive
    and finite (all the noise rows of that sequence). The token_table gradient is deterministic on CPU and
    summed with atomics on CUDA.
    """
    _checks.choice(code, _checks.NOISE_CODES, "noise_conditioned_embedding", "code")
    _reject_noise_grad(u, tau)
    tau_tensor, tau_value = _split_tau(tau, u.shape[0])
    if _ext.use_kernel("noise_conditioned_embedding", u.device):
        return torch.ops.kforcing.noise_conditioned_embedding(token_ids, token_table, u, tau_tensor, tau_value,
                                                              weight, bias, code)
    return reference.noise_conditioned_embedding(token_ids, token_table, u, tau, weight, bias, code)


@torch.library.register_fake("kforcing::noise_embedding")
def _noise_embedding_fake(u, tau, tau_value, weight, bias, code="sinusoid"):
    _checks.noise_embedding(u, tau, weight, bias, tau_scalar=tau_value, code=code)
    return weight.new_empty((u.shape[0], weight.shape[0]))


@torch.library.register_fake("kforcing::noise_embedding_backward")
def _noise_embedding_backward_fake(grad_out, u, tau, tau_value, num_freqs, with_bias, code="sinusoid"):
    _checks.choice(code, _checks.NOISE_CODES, "noise_embedding_backward", "code")
    grad_weight = grad_out.new_empty((grad_out.shape[1], 4 * num_freqs))
    return grad_weight, grad_out.new_empty(grad_out.shape[1]) if with_bias else None


def _setup_context(ctx, inputs, output):
    u, tau, tau_value, weight, bias, code = inputs
    ctx.save_for_backward(u, tau)
    ctx.tau_value = tau_value
    ctx.code = code
    ctx.num_freqs = weight.shape[1] // 4
    ctx.with_bias = bias is not None


def _backward(ctx, grad_out):
    u, tau = ctx.saved_tensors
    grad_weight, grad_bias = torch.ops.kforcing.noise_embedding_backward(
        grad_out, u, tau, ctx.tau_value, ctx.num_freqs, ctx.with_bias, ctx.code)
    return None, None, None, grad_weight, grad_bias, None


torch.library.register_autograd("kforcing::noise_embedding", _backward, setup_context=_setup_context)


@torch.library.register_fake("kforcing::noise_conditioned_embedding")
def _noise_conditioned_fake(token_ids, token_table, u, tau, tau_value, weight, bias, code="sinusoid"):
    _checks.noise_conditioned_embedding(token_ids, token_table, u, tau, weight, bias, tau_scalar=tau_value,
                                        code=code)
    return weight.new_empty((token_ids.shape[0], token_ids.shape[1] + u.shape[1], weight.shape[0]))


@torch.library.register_fake("kforcing::noise_conditioned_embedding_backward")
def _noise_conditioned_backward_fake(grad_out, token_ids, vocab, u, tau, tau_value, num_freqs, with_bias,
                                     code="sinusoid"):
    _checks.choice(code, _checks.NOISE_CODES, "noise_conditioned_embedding_backward", "code")
    width = grad_out.shape[2]
    grad_bias = grad_out.new_empty(width) if with_bias else None
    return grad_out.new_empty((vocab, width)), grad_out.new_empty((width, 4 * num_freqs)), grad_bias


def _conditioned_setup_context(ctx, inputs, output):
    token_ids, token_table, u, tau, tau_value, weight, bias, code = inputs
    ctx.save_for_backward(token_ids, u, tau)
    ctx.args = (token_table.shape[0], tau_value, weight.shape[1] // 4, bias is not None, code)


def _conditioned_backward(ctx, grad_out):
    token_ids, u, tau = ctx.saved_tensors
    vocab, tau_value, num_freqs, with_bias, code = ctx.args
    grad_table, grad_weight, grad_bias = torch.ops.kforcing.noise_conditioned_embedding_backward(
        grad_out, token_ids, vocab, u, tau, tau_value, num_freqs, with_bias, code)
    return None, grad_table, None, None, None, grad_weight, grad_bias, None


torch.library.register_autograd("kforcing::noise_conditioned_embedding", _conditioned_backward,
                                setup_context=_conditioned_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("kforcing: double backward through the noise embeddings is not supported")


for _op in ("noise_embedding_backward", "noise_conditioned_embedding_backward"):
    torch.library.register_autograd(f"kforcing::{_op}", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
