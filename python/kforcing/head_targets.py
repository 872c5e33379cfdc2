"""On-policy targets and losses for a DraftStudent's hint rows, in either pathway (docs/method.md §8).

One training step over contexts ids (B, N), every context position t anchoring a window of k tokens:

    1. trunk (no grad)   the teacher over ids: exact logits at every position, and its token stream (final
                         features for the head pathway, every layer's keys/values for the trunk pathway).
    2. y1                inverse_cdf_sample(teacher logits at t, u_1) under the sampling settings: exact.
    3. draft (grad)      draft logits for tokens 2..k of every window, in one staircase pass: the hint head over
                         the features, or the teacher's blocks with adapters over the keys/values.
    4. drafts            the student's own drafts from those logits (argmax, or its inverse CDF for `categorical`).
    5. teacher (no grad) one staircase pass of the teacher over [context | windows (y1, d_2..d_{k-1})] gives its
                         exact distribution of token j given the window's tokens before j: the distribution a
                         verifier checks draft j against, given the drafts the head really makes (on-policy,
                         windows="student"). With windows="teacher" the windows are the teacher's own exact
                         rollouts instead (y1, t_2, .., t_{k-1}, sampled with the same uniforms: k-2 more staircase
                         passes), the windows verified decoding commits when every draft is right.
    6. loss              onehot: cross-entropy against the teacher's token t_j = inverse_cdf_sample(that
                         distribution, u_j). categorical: KL(teacher || head) between the distributions at the
                         sampling temperature.

The acceptance logged with it is what verified decoding would see on these windows: draft j counts when it and
every draft before it equal the teacher's tokens.

Boundary weighting (onehot readout on teacher windows): a one-hot row must learn where, over u, the teacher's
token switches, and uniform u rarely lands near a switch. Given draws v ~ Beta(b, b), the rollout keeps each token
t_j (so the tokens stay distributed as the teacher's) but moves its uniform to u_j = lower + v (upper - lower)
inside t_j's CDF interval: b < 1 puts u near the interval's ends, b = 1 is uniform again. The student then sees
these uniforms. Validation and evaluation always use uniform u.
"""

import torch
import torch.nn.functional as F

from kforcing_ops.reference import cdf_interval

from .hint_head import DraftStudent, Sampling, drafts_from_logits, sample_rows


WINDOWS = ("student", "teacher")


# Keeps a boundary-weighted u off its interval's ends by this share of the interval: there the kernel's float32
# CDF and the float64 interval may disagree on the token (targets are re-sampled from u, so they stay consistent).
BOUNDARY_MARGIN = 1e-3


def teacher_rollout(student: DraftStudent, ids, y1, u, sampling: Sampling, boundary=None):
    """The teacher's exact windows (B, W, k-1) = (y1, t_2, .., t_{k-1}), its logits after each row (B, W, k-1, V)
    and the uniforms (B, W, k).

    Token j of a window is inverse_cdf_sample of the teacher's distribution given the window so far, with u_j:
    exactly what AR sampling with the window's uniforms produces. boundary: None, or (B, W, k) draws in (0, 1) that
    move u_2..u_k inside their tokens' intervals (module docstring); the returned uniforms are then the moved ones.
    """
    if boundary is not None:
        u = u.clone()
    tokens = y1[..., None]
    for j in range(1, u.shape[2]):
        logits = student.teacher_window_logits(ids, tokens).float()
        if boundary is not None:
            u[..., j] = _inside_interval(logits[:, :, -1], u[..., j], boundary[..., j], sampling)
        if j < u.shape[2] - 1:
            tokens = torch.cat([tokens, sample_rows(logits[:, :, -1], u[..., j], sampling)[..., None]], dim=2)
    return tokens, logits, u


def _inside_interval(logits, u, v, sampling: Sampling):
    """u' = lower + v (upper - lower) in the CDF interval of the token that u samples from logits (..., V)."""
    flat = logits.reshape(-1, logits.shape[-1])
    tokens = sample_rows(logits, u, sampling).reshape(-1)
    lower, upper = cdf_interval(flat, tokens, sampling.temperature, sampling.top_k, sampling.top_p, sampling.order)
    v = v.reshape(-1).double().clamp(BOUNDARY_MARGIN, 1 - BOUNDARY_MARGIN)
    return (lower + v * (upper - lower)).view(u.shape).to(u.dtype)


def head_step(student: DraftStudent, ids, u, sampling: Sampling, windows: str = "student", boundary=None):
    """The loss of one batch and its metrics (see the module docstring).

    Args:
        student: the DraftStudent (its head in train mode), either pathway.
        ids: (B, N) contexts; every position anchors a window.
        u: (B, N, k) uniforms of tokens 1..k of every window, k <= student.max_k.
        sampling: the teacher's sampling settings.
        windows: "student" (the head's own drafts, on-policy) or "teacher" (the teacher's exact rollouts).
        boundary: None (uniform u), or (B, N, k) Beta(b, b) draws for boundary weighting: onehot readout and
            teacher windows only.

    Returns:
        (loss, metrics): metrics has "loss", "acceptance" (k-1 floats: drafts 2..j+2 all equal the teacher's
        tokens) and "tokens_per_pass" (1 + their sum: the verified tokens per pass these windows predict).
    """
    if windows not in WINDOWS:
        raise ValueError(f"unknown windows {windows!r}; choose one of {WINDOWS}")
    config = student.head_config
    if (config.pathway, config.readout, u.shape[2]) == ("trunk", "categorical", 2):
        raise ValueError("k = 2 leaves a categorical trunk student nothing to train: its draft of token 2 comes from "
                         "the teacher's own row (use k >= 3)")
    readout = config.readout
    if boundary is not None and (readout, windows) != ("onehot", "teacher"):
        raise ValueError(f"boundary weighting needs the onehot readout on teacher windows, got readout {readout!r} "
                         f"on {windows!r} windows (a categorical row never sees its own uniform, and a student "
                         "window's tokens depend on the uniforms being moved)")
    with torch.no_grad():
        stream, logits = student.trunk(ids)
        y1 = sample_rows(logits[:, :u.shape[1]], u[..., 0], sampling)
        if windows == "teacher":  # before the student's pass: boundary weighting moves the uniforms it sees
            _, teacher_logits, u = teacher_rollout(student, ids, y1, u, sampling, boundary)
    draft_logits = student.draft_logits(ids, stream, y1, u, sampling.temperature)
    with torch.no_grad():
        drafts = drafts_from_logits(draft_logits.detach(), u, readout, sampling)
        if windows == "student":
            window_tokens = torch.cat([y1[..., None], drafts[..., :-1]], dim=2)
            teacher_logits = student.teacher_window_logits(ids, window_tokens).float()
        targets = sample_rows(teacher_logits, u[..., 1:], sampling)
    if readout == "onehot":
        loss = F.cross_entropy(draft_logits.float().flatten(0, 2), targets.flatten())
    else:
        log_q = F.log_softmax(draft_logits.float() / sampling.temperature, dim=-1)
        p = F.softmax(teacher_logits / sampling.temperature, dim=-1)
        loss = F.kl_div(log_q, p, reduction="none").sum(-1).mean()
    accepted = (drafts == targets).long().cumprod(dim=-1).double().mean(dim=(0, 1))
    metrics = {"loss": loss.item(), "acceptance": accepted.tolist(), "tokens_per_pass": 1 + accepted.sum().item()}
    return loss, metrics


__all__ = ["BOUNDARY_MARGIN", "WINDOWS", "head_step", "teacher_rollout"]
