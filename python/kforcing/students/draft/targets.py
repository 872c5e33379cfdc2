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

The chain pathway (`kforcing.students.draft.chain_head`) trains teacher-forced instead (`chain_step`): one head pass
over the teacher's features of the context and the text's tokens, KL(teacher || head) at every position plus a smooth-L1
pull of the head's features towards the teacher's. Its validation runs the chain on its own drafts, as decoding does
(`chain_rollout`), and counts, per offset, the drafts that equal the teacher's samples under the same uniforms.

Boundary weighting (onehot readout on teacher windows): a one-hot row must learn where, over u, the teacher's
token switches, and uniform u rarely lands near a switch. Given draws v ~ Beta(b, b), the rollout keeps each token
t_j (so the tokens stay distributed as the teacher's) but moves its uniform to u_j = lower + v (upper - lower)
inside t_j's CDF interval: b < 1 puts u near the interval's ends, b = 1 is uniform again. The student then sees
these uniforms. Validation and evaluation always use uniform u.
"""

import torch
import torch.nn.functional as F

import kforcing_ops
from kforcing_ops import cdf_interval

from ...models.transformer import run_blocks
from .chain_head import FEATURE_LOSS_WEIGHT
from .student import DraftStudent, Sampling, drafts_from_logits, sample_rows

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
        loss = _kl(draft_logits, teacher_logits, sampling)
    accepted = (drafts == targets).long().cumprod(dim=-1).double().mean(dim=(0, 1))
    metrics = {"loss": loss.item(), "acceptance": accepted.tolist(), "tokens_per_pass": 1 + accepted.sum().item()}
    return loss, metrics


def _kl(draft_logits, teacher_logits, sampling: Sampling):
    """Mean KL(teacher || draft) of the distributions at the sampling temperature."""
    log_q = F.log_softmax(draft_logits.float() / sampling.temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / sampling.temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()


def chain_rollout(student: DraftStudent, features, ids, steps: int, continue_with):
    """The chain as decoding runs it, on every context position at once: (head features (B, W, steps + 1, H),
    tokens (B, W, steps + 1)), W = N - 1.

    Window p starts from the teacher-forced head row p (ids[p+1] stands for the round's exact token); its row j
    stands for the teacher's feature at p+1+j, whose readout gives the distribution of token p+2+j, and the window
    continues with continue_with(j, row j's features (B, W, H)) -> tokens (B, W), its draft in validation. Row
    j >= 1 fuses the head's feature of row j-1 with the token row j-1 continued with, and sees the context rows up
    to p and its own window causally (the staircase mask).
    """
    head, teacher = student.head, student.teacher
    context_rows = head.rows(teacher, features[:, :-1], ids[:, 1:])
    width = context_rows.shape[1]
    hidden = [head.run_rows(context_rows)]
    tokens = [continue_with(0, hidden[0])]
    window_rows = []
    for step in range(1, steps + 1):
        window_rows.append(head.rows(teacher, hidden[-1], tokens[-1]))
        x = torch.cat([context_rows, torch.stack(window_rows, dim=2).flatten(1, 2)], dim=1)
        positions = DraftStudent.staircase_positions(width, width, step, x.device)
        out = run_blocks(head.blocks, x, positions, head.inv_freq,
                         lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, width, step))
        hidden.append(out[:, width:].view(x.shape[0], width, step, -1)[:, :, -1])
        tokens.append(continue_with(step, hidden[-1]))
    return torch.stack(hidden, dim=2), torch.stack(tokens, dim=2)


def chain_step(student: DraftStudent, ids, u, sampling: Sampling, rollout: bool = False):
    """The loss of one batch of a chain student and its metrics.

    Training is teacher-forced: head row p reads the teacher's feature at p and the text's token p+1, and its loss
    is KL(teacher || head) against the teacher's distribution of token p+2 plus the smooth-L1 pull of its feature
    towards the teacher's feature at p+1. (Training the chain deeper, each later row reading the head's own feature
    and the text's next token, measured worse at equal wall clock: it costs about three teacher-forced steps and
    did not raise the acceptance of later drafts given the earlier ones.)

    Args:
        student: a chain-pathway DraftStudent.
        ids: (B, N) contexts; u: (B, N, k) uniforms (u[:, p, 1:] are the uniforms of the drafts of window p).
        rollout: False (training): the loss, and the share of head rows whose draft, sampled with its uniform,
            equals the teacher's sample (the first draft's acceptance, teacher-forced).
            True (validation): also run the chain k-1 drafts deep on its own drafts, as decoding does, and measure
            acceptance at every offset: the share of windows whose drafts up to it all equal the teacher's tokens.

    Returns:
        (loss, metrics): "loss", "acceptance" (1 float in training, k-1 with rollout) and, with rollout,
        "tokens_per_pass" (1 + their sum).
    """
    teacher, steps = student.teacher, u.shape[2] - 1
    with torch.no_grad():
        stream, teacher_logits = student.trunk(ids)
    features = stream.features
    head_features = student.head.forward_train(teacher, features, ids)
    draft_logits = teacher.logits(head_features)  # the whole vocabulary: a draft vocabulary only restricts decoding
    target_logits = teacher_logits[:, 1:]
    loss = _kl(draft_logits, target_logits, sampling) + FEATURE_LOSS_WEIGHT * F.smooth_l1_loss(
        head_features.float(), features[:, 1:].float())
    window_u = u[:, :-1, 1:]
    with torch.no_grad():
        if not rollout:  # measured on two sequences: sampling every row would cost a fifth of the step
            rows = slice(0, 2)
            drafts = sample_rows(draft_logits[rows].detach(), window_u[rows, :, 0], sampling)
            matches = drafts == sample_rows(target_logits[rows], window_u[rows, :, 0], sampling)
            return loss, {"loss": loss.item(), "acceptance": [matches.double().mean().item()]}
        head = student.head

        def draft(step, features):
            return head.token_ids(sample_rows(head.readout(teacher, features), window_u[..., step], sampling))

        _, drafts = chain_rollout(student, features, ids, steps - 1, draft)
        targets = target_logits[:, :, None]
        if steps > 1:  # the teacher's distributions after each window's drafts: window p's context ends at ids[p+1],
            # so it is the teacher's window anchored at p+1 (window 0, anchored at ids[0], is padding)
            window_tokens = drafts[:, :, :-1]
            later = student.teacher_window_logits(ids, torch.cat([window_tokens[:, :1], window_tokens], dim=1))
            targets = torch.cat([targets, later[:, 1:].float()], dim=2)
        teacher_tokens = sample_rows(targets, window_u, sampling)
        accepted = (drafts == teacher_tokens).long().cumprod(dim=-1).double().mean(dim=(0, 1))
    return loss, {"loss": loss.item(), "acceptance": accepted.tolist(), "tokens_per_pass": 1 + accepted.sum().item()}


__all__ = ["BOUNDARY_MARGIN", "WINDOWS", "chain_rollout", "chain_step", "head_step", "teacher_rollout"]
