"""Speculative sampling's acceptance rule (Leviathan et al., 2023; Chen et al., 2023): verification that is lossless
in distribution rather than token for token.

The coupled rule of verified decoding keeps a draft when it equals the token the teacher samples with the same
uniform, so the output equals `generate_ar`'s. This rule instead keeps draft d_j, drawn from the draft distribution
q_j, with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection it samples the residual
norm(max(0, p_j - q_j)), and when every draft stands it samples one more token from p. Each output token is then
distributed as the teacher's p given the tokens before it, whatever q is, and a draft with q close to p is kept
with probability close to 1 - TV(p, q) even where the coupled rule's inverse CDFs would split.

Its randomness comes from two more counter streams per position (acceptance and residual uniforms), so a sample is
still a pure function of (seed, sequence, position).
"""

import torch


def inverse_cdf(probs, u):
    """Token ids (...) drawn from probabilities (..., V) with uniforms u (...) by float64 inverse CDF; a token of zero
    probability is never returned (u past the rounded total mass gets the last token of nonzero mass)."""
    cdf = probs.double().cumsum(dim=-1)
    token = torch.searchsorted(cdf, (u.double() * cdf[..., -1])[..., None]).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    return torch.minimum(token, last)


def speculative_accept(p, q, drafts, accept_u, residual_u):
    """New tokens and accepted counts of one round of speculative sampling.

    Args:
        p: (B, c + 1, V) the teacher's probabilities after the exact token and after each draft.
        q: (B, c, V) the draft distributions the drafts were drawn from.
        drafts: (B, c) int64.
        accept_u: (B, c) uniforms of the acceptance tests.
        residual_u: (B, c + 1) uniforms of the token after the accepted drafts: from the residual at a rejection,
            from p after the last draft when every draft stands.

    Returns:
        (new_tokens (B, c + 1), n_accepted (B,)): the accepted drafts, then the sampled token at index n_accepted
        (the entries after it are not tokens of the output).
    """
    count = drafts.shape[1]
    p_draft = p[:, :count].gather(2, drafts[..., None]).squeeze(-1)
    q_draft = q.gather(2, drafts[..., None]).squeeze(-1)
    kept = (accept_u.double() * q_draft <= p_draft).long().cumprod(dim=1)
    n_accepted = kept.sum(dim=1)
    residual = (p[:, :count] - q).clamp(min=0)
    # p == q leaves no residual, and then no draft is ever rejected: p itself stands in, never used.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[:, :count])
    sources = torch.cat([residual, p[:, count:]], dim=1)  # row j: what position j samples from when reached
    chosen = sources.gather(1, n_accepted[:, None, None].expand(-1, 1, sources.shape[-1])).squeeze(1)
    token = inverse_cdf(chosen, residual_u.gather(1, n_accepted[:, None]).squeeze(1))
    new_tokens = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, n_accepted[:, None], token[:, None])
    return new_tokens, n_accepted


__all__ = ["inverse_cdf", "speculative_accept"]
