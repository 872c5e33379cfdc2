"""What a push-forward distillation stage learns: its targets and the loss (docs/method.md §5).

The targets are always the teacher's own outputs under the very noise the student sees; data tokens only provide
contexts.

Stage k = 1 (teacher = the AR model). For a context batch ids (B, N), every position t is the anchor of a window
with one uniform u_t and the sequence's temperature tau. The target of window t is the teacher's inverse-CDF token

    y_t = min { v : sum_{v' <= v} softmax(logits_t / tau)_v' >= u_t }          (`ar_targets`)

computed with a float64 CDF (`inverse_cdf_float64`).

Stage k -> 2k (teacher = the frozen stage-k student). Each window draws 2k uniforms. The teacher produces its
tokens 1..k by one staircase pass with (u_1..u_k) and argmax; then tokens k+1..2k by a second pass with window size
2k, in which its own first k tokens are token rows and (u_{k+1}..u_{2k}) the hints (`self_forcing_targets`). That is
exactly two consecutive decode steps of the teacher on its own outputs (`generate_kforcing` with k tokens per pass),
for every window in parallel.

Baseline (`noise_inversion_batch`): data tokens are the targets, and each u_j is drawn inside the data token's CDF
interval under the AR teacher at tau. At inference the student conditions on its own tokens, never on data (a
train/inference mismatch), and a token of tiny probability has an interval float64 can barely hit; the fraction of
windows whose u really maps back to the data token is returned as `valid`.

Loss (`window_loss`): cross-entropy of the student's logits at every hint row against its target, with the
per-offset loss and accuracy and the whole-window exact match.

The noise of the batches is `kforcing.training.batch_noise`.
"""

import contextlib

import torch
import torch.nn.functional as F

import kforcing_ops

from ...models.transformer import ARModel
from .model import PushForwardLM, broadcast_tau


def inverse_cdf_float64(logits: torch.Tensor, u: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """`kforcing_ops.inverse_cdf_sample` on float64 logits: the exact rule, with a float64 CDF.

    The CPU kernel samples float64 logits itself. The CUDA kernel takes 16/32-bit logits only, so on a GPU the op's
    float64 reference runs: one row per target, small next to the teacher pass that produced the logits.
    """
    logits = logits.double()
    if logits.device.type == "cpu":
        return kforcing_ops.inverse_cdf_sample(logits, u, temperature)
    with kforcing_ops.use_reference():
        return kforcing_ops.inverse_cdf_sample(logits, u, temperature)


def _tau_per_row(tau, batch: int, rows: int, device):
    """tau as one float64 value per row of (batch * rows) logits, or a float."""
    per_row = broadcast_tau(tau, torch.empty(batch, rows, device=device))
    return per_row if not isinstance(per_row, torch.Tensor) else per_row.to(torch.float64).reshape(-1)


@torch.no_grad()
def ar_targets(teacher: ARModel, ids: torch.Tensor, u: torch.Tensor, tau) -> torch.Tensor:
    """Stage 1 targets: the AR teacher's inverse-CDF token after every context position, at temperature tau.

    Args:
        teacher: the AR model (its logits are computed in float32, autocast off).
        ids: (B, N) context tokens.
        u: (B, W, 1) uniforms, W <= N windows: window t is anchored at context position t.
        tau: a float or a (B,) tensor: the temperature of each sequence.

    Returns:
        (B, W, 1) int64: inverse_cdf_float64(logits at t, u[:, t, 0], tau), i.e. the token the
        teacher samples at position t+1 with the uniform u (smallest v whose float64 CDF reaches u).
    """
    if not isinstance(teacher, ARModel):
        raise TypeError(f"ar_targets needs an ARModel teacher, got {type(teacher).__name__}")
    if u.dim() != 3 or u.shape[2] != 1 or u.shape[0] != ids.shape[0] or u.shape[1] > ids.shape[1]:
        raise ValueError(f"`u` must be (B, W, 1) with B={ids.shape[0]} and W <= N={ids.shape[1]}, "
                         f"got {tuple(u.shape)}")
    batch, windows = u.shape[:2]
    with _no_autocast(ids.device):
        logits = teacher(ids)[:, :windows]
    flat = logits.reshape(batch * windows, -1).double()
    temperature = _tau_per_row(tau, batch, windows, ids.device)
    tokens = inverse_cdf_float64(flat, u.reshape(-1).double().contiguous(), temperature)
    return tokens.view(batch, windows, 1)


@torch.no_grad()
def self_forcing_targets(teacher: PushForwardLM, ids: torch.Tensor, u: torch.Tensor, tau) -> torch.Tensor:
    """Stage k -> 2k targets: two consecutive K-Forcing decode steps of the stage-k teacher, for every window.

    Args:
        teacher: the frozen stage-k student (a PushForwardLM with max_k >= k; run in float32, autocast off).
        ids: (B, N) context tokens.
        u: (B, W, 2k) uniforms: u[:, t, :k] for the teacher's first step from window t, u[:, t, k:] for its second.
        tau: a float or a (B,) tensor.

    Returns:
        (B, W, 2k) int64. Tokens 0..k-1 = argmax of a staircase pass with u[..., :k]; tokens k..2k-1 = argmax of
        a pass with window size 2k whose first k rows are those tokens (at positions t+1..t+k) and whose k hints
        carry u[..., k:]. That is `generate_kforcing(teacher, ids[b, :t+1], 2k, k=k)` for window t when its
        uniforms are u[b, t] (tested token for token); like decoding, the argmax is taken over float32 logits.
    """
    if not isinstance(teacher, PushForwardLM):
        raise TypeError(f"self_forcing_targets needs a PushForwardLM teacher, got {type(teacher).__name__}")
    if u.dim() != 3 or u.shape[2] % 2 or u.shape[0] != ids.shape[0]:
        raise ValueError(f"`u` must be (B, W, 2k) with B={ids.shape[0]}, got {tuple(u.shape)}")
    k = u.shape[2] // 2
    if k > teacher.max_k:
        raise ValueError(f"2k = {2 * k} uniforms per window need a teacher with max_k >= {k}, "
                         f"this one has max_k={teacher.max_k}")
    with _no_autocast(ids.device):
        first = teacher.forward_train(ids, u[..., :k], tau).float().argmax(-1)
        second = teacher.forward_train(ids, u[..., k:], tau, window_size=2 * k, window_tokens=first)
    return torch.cat([first, second.float().argmax(-1)], dim=2)


@torch.no_grad()
def noise_inversion_batch(teacher: ARModel, tokens: torch.Tensor, v: torch.Tensor, tau):
    """The noise-inversion baseline: data tokens as targets, u drawn inside their CDF interval under the teacher.

    Args:
        teacher: the AR model.
        tokens: (B, N + K) data tokens: context x_0..x_{N-1} and K more, so that window t targets x_{t+1..t+K}.
        v: (B, N, K) uniforms in [0, 1) that place each u inside its interval.
        tau: a float or a (B,) tensor.

    Returns:
        (ids (B, N), u (B, N, K) float64, targets (B, N, K) int64, valid (B, N, K) bool). For target y at position
        p the teacher's float64 CDF under x_{<p} at tau gives the interval (C(y-1), C(y)], and
        u = C(y-1) + v * (C(y) - C(y-1)), clamped into the interval. `valid` says whether u maps back to y under
        the exact inverse-CDF rule: a token whose probability is below float64 resolution next to its CDF cannot be
        hit, which is the numerical fragility the paper reports.
    """
    if not isinstance(teacher, ARModel):
        raise TypeError(f"noise_inversion_batch needs an ARModel teacher, got {type(teacher).__name__}")
    batch, windows, k = v.shape
    if tokens.shape != (batch, windows + k):
        raise ValueError(f"`tokens` must be (B, N + K) = ({batch}, {windows + k}), got {tuple(tokens.shape)}")
    with _no_autocast(tokens.device):
        logits = teacher(tokens[:, :-1]).double()  # (B, N + K - 1, V): position p predicts p + 1
    temperature = _tau_per_row(tau, batch, 1, tokens.device)
    logits = logits / (temperature.view(batch, 1, 1) if isinstance(temperature, torch.Tensor) else temperature)
    # Window t, offset j targets the token at t + 1 + j, predicted by the logits at t + j.
    index = torch.arange(windows, device=tokens.device)[:, None] + torch.arange(k, device=tokens.device)
    targets = tokens[:, 1:][:, index]  # (B, N, K)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # the reference's float64 CDF
    cdf_windows = cdf[:, index]  # (B, N, K, V)
    upper = cdf_windows.gather(-1, targets[..., None]).squeeze(-1)
    below = (targets - 1).clamp(min=0)
    lower = torch.where(targets > 0, cdf_windows.gather(-1, below[..., None]).squeeze(-1),
                        torch.zeros_like(upper))
    u = lower + v.double() * (upper - lower)
    u = torch.minimum(torch.maximum(u, torch.nextafter(lower, torch.ones_like(lower))), upper).clamp(0.0, 1.0)
    sampled = inverse_cdf_float64(logits[:, index].reshape(-1, logits.shape[-1]), u.reshape(-1).contiguous())
    valid = sampled.view_as(targets) == targets
    return tokens[:, :windows], u, targets, valid


@contextlib.contextmanager
def _no_autocast(device):
    with torch.autocast(device.type if isinstance(device, torch.device) else str(device), enabled=False):
        yield


# ---------------------------------------------------------------------------------------------------------
# Loss


def window_loss(logits: torch.Tensor, targets: torch.Tensor):
    """(mean loss, per-offset loss (K,), per-offset accuracy (K,), exact match) of hint logits (B, W, K, V)."""
    per_token = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none")
    per_token = per_token.view(targets.shape)
    correct = logits.detach().float().argmax(-1) == targets
    return (per_token.mean(), per_token.detach().mean(dim=(0, 1)), correct.float().mean(dim=(0, 1)),
            correct.all(dim=-1).float().mean())


__all__ = ["ar_targets", "inverse_cdf_float64", "noise_inversion_batch", "self_forcing_targets", "window_loss"]
