"""The prefill every decoder runs: the same passes over the same rows, so that their caches hold the same bits.

A batch of prompts of lengths P_b is prefilled in two passes:

    ragged prefix   every prompt's first P_b - min(P) tokens, right-padded to the longest (skipped when the prompts
                    have one length); each sequence's cache length then moves to its own prefix length, so the
                    padding rows lie past it and the next pass overwrites them
    tail            every prompt's last min(P) tokens, alike for every sequence (the decoder's own first pass: AR's
                    reads the last row's logits, a push-forward student's adds its first hint rows, a draft
                    student's keeps every row's features for its head)

Why one procedure for all of them: verified decoding equals AR token for token only if the teacher's cache holds
the same bits in both. Past DECODE_LINEAR_MAX_ROWS rows a prefill pass runs torch's GEMM, whose bits for a row
depend on the call's shape, so the draft decoder prefills exactly as `generate_ar` does (and every pass after the
prefill runs inside `kforcing_ops.nn.row_invariant_linears()`, where no such dependence exists).
"""

from typing import Callable, Tuple

import torch

from .request import PromptBatch


def prefill_ragged_prefix(run: Callable[[torch.Tensor], object], seqlens: torch.Tensor, prompts: PromptBatch,
                          pad_id: int) -> Tuple[int, object]:
    """The ragged-prefix pass (module docstring): run(ids (B, longest prefix)) appends the rows to the decoder's
    cache(s); then `seqlens` (the teacher cache's lengths, int32) become each prefix's length. Returns (passes run,
    run's output): (1, output), or (0, None) without running anything when every prompt has the same length."""
    longest = max(len(p) for p in prompts.prefix)
    if longest == 0:
        return 0, None
    ids = torch.full((prompts.batch, longest), pad_id, dtype=torch.int64)
    for b, p in enumerate(prompts.prefix):
        ids[b, :len(p)] = torch.tensor(p, dtype=torch.int64)
    out = run(ids.to(seqlens.device))
    seqlens.copy_(torch.tensor([len(p) for p in prompts.prefix], dtype=torch.int32))
    return 1, out


def prompt_next_tokens(prompts: PromptBatch, prefix_width: int, first_new: torch.Tensor):
    """The token that follows every prefilled row: ((B, prefix_width) for the ragged-prefix pass's rows, (B, min P)
    for the tail's), the tail's last row followed by first_new (B,), each sequence's first generated token.
    Padding rows get pad tokens (0); they are never kept."""
    batch, device = prompts.batch, prompts.tail.device
    after_prefix = torch.zeros((batch, prefix_width), dtype=torch.int64)
    for b, (prefix, prompt) in enumerate(zip(prompts.prefix, prompts.prompts)):
        after_prefix[b, :len(prefix)] = torch.tensor(prompt[1:len(prefix) + 1], dtype=torch.int64)
    after_tail = torch.cat([prompts.tail[:, 1:], first_new[:, None]], dim=1)
    return after_prefix.to(device), after_tail


__all__ = ["prefill_ragged_prefix", "prompt_next_tokens"]
