"""The round loop every decoder shares: the output, each sequence's progress, EOS, when to stop, the statistics.

A decoder is a *round*: from the batch's state it makes new tokens for every sequence and says how many of each
sequence's count. AR makes one token a round, the push-forward student k, a draft student 1 + its accepted drafts
(a number that differs between sequences and rounds). Everything else is the same for all of them and lives here:

    RoundLoop       the (B, max_new_tokens) output and each sequence's tokens made, finished (EOS or its tokens
                    made) and passes taken part in; which sequences are active; the end of the loop (one host sync
                    a round, or none while no round can end a sequence early); the result with EOS masking
    compiled        `kforcing.decoding.compiled`: a round or a step torch.compile'd once per process and shape
    check_request   `kforcing.decoding.request`: the checks of a request

The batch keeps its shape until every sequence is done (static shapes, so a round can be compiled or captured):
a finished sequence's slot keeps running, and its later tokens are not recorded.

Two ways to record a round. `record_all(tokens)`: every sequence advances by the same T tokens (AR, push-forward),
written as one column block, with no per-sequence bookkeeping (the AR step stays as cheap as it can be). `record(
tokens, advance, active)`: sequence b keeps its first advance[b] tokens (a draft student's round), written after
the tokens it has, as a scatter.
"""

from typing import Optional

import torch

from .request import mask_after_eos


class RoundLoop:
    """The state every decoder's loop shares (module docstring).

    Args:
        batch, max_new_tokens, eos_id, pad_id: the request's.
        max_round: the most tokens one round may make for a sequence (the output buffer's slack: a round's tokens
            past max_new_tokens are written there and dropped).
        device: where the request's tensors live.
    """

    def __init__(self, batch: int, max_new_tokens: int, eos_id: Optional[int], pad_id: int, max_round: int,
                 device):
        self.max_new_tokens, self.eos_id, self.pad_id = max_new_tokens, eos_id, pad_id
        self.tokens = torch.full((batch, max_new_tokens + max_round), pad_id, dtype=torch.int64, device=device)
        self.produced = torch.zeros(batch, dtype=torch.int64, device=device)  # tokens made, per sequence
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)  # emitted EOS
        self.sequence_passes = torch.zeros(batch, dtype=torch.int64, device=device)
        self.passes = 0  # forward passes of the batch
        self._columns = 0  # tokens made by every sequence alike (record_all)
        self._offsets = torch.arange(max_round, device=device)

    def active(self) -> torch.Tensor:
        """(B,) the sequences still decoding: no EOS yet and tokens left to make."""
        return ~self.finished & (self.produced < self.max_new_tokens)

    @staticmethod
    def done(active: torch.Tensor) -> bool:
        """Whether every sequence is done, given `active()` (a host sync)."""
        return not bool(active.any())

    def count_passes(self, passes: int = 1, sequence_passes: Optional[torch.Tensor] = None):
        """Count `passes` forward passes of the batch (a prefill, a round) and, per sequence, `sequence_passes`
        (B,) of them (default: all of them, for every sequence; 0: none, `record` counted them)."""
        self.passes += passes
        self.sequence_passes += passes if sequence_passes is None else sequence_passes

    def record_all(self, tokens: torch.Tensor) -> bool:
        """Record (B, T) tokens that every sequence made alike (its next T tokens, written whatever it has
        emitted: EOS masking drops those after an EOS). Returns whether the loop may stop: every sequence has its
        tokens, or, with an EOS id, has emitted it (a host sync, only then)."""
        width = tokens.shape[1]
        self.tokens[:, self._columns:self._columns + width] = tokens
        self._columns += width
        self.produced += width
        if self._columns >= self.max_new_tokens:
            return True
        if self.eos_id is None:
            return False
        self.finished |= (tokens == self.eos_id).any(dim=1)
        return bool(self.finished.all())

    def record(self, tokens: torch.Tensor, advance: torch.Tensor, active: torch.Tensor,
               took_part: Optional[torch.Tensor] = None):
        """Record each active sequence's first advance[b] tokens of `tokens` (B, T) after the ones it has (0 for
        inactive sequences); a sequence that emits EOS among them is finished. took_part: (B,) passes each sequence
        took part in, counted here (tensor ops only, so that a compiled round can record itself; the batch's
        passes, a Python int, are `count_passes`')."""
        width = tokens.shape[1]
        offsets = self._offsets[:width] if width <= self._offsets.shape[0] else torch.arange(width,
                                                                                             device=tokens.device)
        keep = active[:, None] & (offsets[None, :] < advance[:, None])
        index = (self.produced[:, None] + offsets).clamp(max=self.tokens.shape[1] - 1)
        self.tokens.scatter_(1, index, torch.where(keep, tokens, self.tokens.gather(1, index)))
        if self.eos_id is not None:
            self.finished |= ((tokens == self.eos_id) & keep).any(dim=1)
        self.produced += torch.where(active, advance, 0)
        if took_part is not None:
            self.sequence_passes += took_part

    def result(self):
        """(tokens (B, max_new_tokens) with pad_id after each sequence's EOS, lengths (B,) up to and including
        it, passes, each sequence's tokens over the passes it took part in, averaged over the batch)."""
        tokens, lengths = mask_after_eos(self.tokens[:, :self.max_new_tokens], self.eos_id, self.pad_id)
        rate = (lengths.double() / self.sequence_passes.clamp(min=1).double()).mean().item()
        return tokens, lengths, self.passes, rate


__all__ = ["RoundLoop"]
