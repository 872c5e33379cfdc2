"""A generation request, as every decoder takes it: its checks, its prompts split for the ragged prefill, its
uniforms as one table, and the EOS masking of its output.

`kforcing.decoding.generate` (AR and push-forward decoding) and `kforcing.students.draft.decode` (draft students) both
use it, so neither imports the other for it.
"""

import dataclasses
from typing import List

import torch

from ..noise import counter_uniform


def as_prompt_list(prompts) -> List[List[int]]:
    """Prompts as lists of token ids, from a list of lists / 1-D tensors or a (B, P) tensor."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"`prompts` as a tensor must be (B, P), got shape {tuple(prompts.shape)}")
        return prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("`prompts` must be a non-empty list of token-id lists (or 1-D tensors), or a (B, P) tensor")
    result = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        if isinstance(prompt, int):
            raise ValueError("`prompts` must be a list of prompts (lists of token ids), not one flat list; "
                             "wrap a single prompt: [prompt]")
        result.append([int(t) for t in prompt])
    return result


def check_request(model, prompts, max_new_tokens, sequence_ids, eos_id, pad_id):
    """Validate a generation request: (prompts as lists of ids, sequence ids (B,) int64 on the model's device)."""
    prompt_list = as_prompt_list(prompts)
    config = model.config
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    for i, prompt in enumerate(prompt_list):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. the EOS/BOS token)")
        if len(prompt) > config.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, longer than the model's "
                             f"max_seq_len={config.max_seq_len}")
        if len(prompt) + max_new_tokens > config.max_seq_len:
            raise ValueError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's max_seq_len={config.max_seq_len}")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={config.vocab_size}): {bad[:5]}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= value < config.vocab_size:
            raise ValueError(f"{name}={value} is outside [0, vocab_size={config.vocab_size})")
    batch = len(prompt_list)
    if sequence_ids is None:
        sequence_ids = torch.arange(batch, dtype=torch.int64)
    sequence_ids = torch.as_tensor(sequence_ids, dtype=torch.int64).flatten()
    if sequence_ids.shape[0] != batch:
        raise ValueError(f"sequence_ids has {sequence_ids.shape[0]} entries for {batch} prompts")
    return prompt_list, sequence_ids.to(model.device)


@dataclasses.dataclass
class PromptBatch:
    """A request's prompts as the decoders' prefill takes them (`kforcing.decoding.prefill`).

    Attributes:
        prompts: the B prompts as lists of ids.
        prefix: each prompt's first P_b - min(P) tokens (the ragged part: one prefill pass of its own).
        tail: (B, min(P)) int64, each prompt's last min(P) tokens (every sequence alike from here on).
        lengths: (B,) int64, P_b.
        sequence_ids: (B,) int64, each sequence's noise stream.
    """

    prompts: List[List[int]]
    prefix: List[List[int]]
    tail: torch.Tensor
    lengths: torch.Tensor
    sequence_ids: torch.Tensor

    @property
    def batch(self) -> int:
        return self.tail.shape[0]


def prompt_batch(model, prompts, max_new_tokens, sequence_ids, eos_id, pad_id) -> PromptBatch:
    """Check a request (`check_request`) and split its prompts for the prefill."""
    prompt_list, sequence_ids = check_request(model, prompts, max_new_tokens, sequence_ids, eos_id, pad_id)
    shortest = min(len(p) for p in prompt_list)
    device = sequence_ids.device
    return PromptBatch(prompt_list, [p[:len(p) - shortest] for p in prompt_list],
                       torch.tensor([p[len(p) - shortest:] for p in prompt_list], dtype=torch.int64, device=device),
                       torch.tensor([len(p) for p in prompt_list], dtype=torch.int64, device=device), sequence_ids)


def uniform_table(seed, sequence_ids, length) -> torch.Tensor:
    """(B, length) float64: every uniform a request can use, u[b, p] = counter_uniform(seed, sequence_ids[b], p),
    computed once (a decoder gathers its rows instead of hashing them again every step)."""
    return counter_uniform(seed, sequence_ids[:, None], torch.arange(length, device=sequence_ids.device))


def mask_after_eos(tokens, eos_id, pad_id):
    """(tokens with everything after the first EOS set to pad_id, lengths up to and including EOS)."""
    if eos_id is None:
        return tokens, torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.int64, device=tokens.device)
    is_eos = tokens == eos_id
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return tokens.masked_fill(after, pad_id), (~after).sum(dim=1)


__all__ = ["PromptBatch", "as_prompt_list", "check_request", "mask_after_eos", "prompt_batch", "uniform_table"]
