"""The chain pathway: a draft student whose drafts come from a small head run once per draft (docs/method.md §8).

After the teacher's verify pass the round knows, for every committed position p, the teacher's final feature F_p
(before the final norm) and the token that followed it. The head reads the pair

    row p = fuse([F_p | tok_emb(token at p+1)])          a Linear from 2H to H
    f_p   = blocks(row p)                                 copies of the teacher's last block(s), causal, own KV cache

and f_p stands in for the teacher's feature at p+1: the teacher's own final norm and LM head turn it into the
distribution of the token at p+2. Drafting is a chain: from the last committed pair (the teacher's feature and the
round's exact token), draft 1 = inverse_cdf_sample(that distribution, u of its position); the next row fuses f with
draft 1's embedding, and so on, k-1 times. Every draft is sampled with the uniform the teacher verifies it with, so a
draft stands exactly when it is the teacher's own sample (the coupled rule), and with `acceptance="speculative"`
the head's distributions are the proposals.

A round therefore reads the teacher once (k rows) plus k-1 head calls (the first over the rows the round
committed, the others one row each), instead of a second pass through every block. With `draft_vocab` N the
drafts' readout covers only the N most frequent tokens of the training text (the LM head is most of a one-block
head's bytes): a draft can then never be a rarer token, and the teacher's verification stays exact.

Training (`kforcing.students.draft.targets.chain_step`) is teacher-forced: on the teacher's features of real text,
KL(teacher || head) at the sampling temperature plus a small smooth-L1 pull of f_p towards F_{p+1}, which is what
lets the chain continue from its own features.

Head rows live at rotary position p (the position of the feature they read), in training and in the head's decode
cache alike.
"""

from typing import Optional

import torch
from torch import nn

import kforcing_ops
from kforcing_ops.nn import DecodeLinear

from ...models.transformer import Block, KeepsRotaryFloat32, ModelConfig, decode_blocks, rotary_inv_freq, run_blocks
from .draft_module import DraftModule

FEATURE_LOSS_WEIGHT = 0.1  # the smooth-L1 pull of the head's features towards the teacher's (beside the KL)


def block_config(teacher_config, num_layers: int) -> ModelConfig:
    """The kforcing ModelConfig of the head's blocks: a kforcing teacher's own, or, for a Hugging Face teacher
    (`kforcing.teachers.hf_teacher.HFModelConfig`), kforcing blocks of its width, heads and key/value heads."""
    if isinstance(teacher_config, ModelConfig):
        return teacher_config
    if teacher_config.head_dim * teacher_config.n_head != teacher_config.n_embd:
        raise ValueError(f"a chain head needs head_dim x heads = width; this teacher has {teacher_config.n_head} "
                         f"heads of {teacher_config.head_dim} in a width of {teacher_config.n_embd}")
    return ModelConfig(vocab_size=teacher_config.vocab_size, n_layer=num_layers, n_embd=teacher_config.n_embd,
                       n_head=teacher_config.n_head, n_kv_head=teacher_config.n_kv_head,
                       max_seq_len=teacher_config.max_seq_len)


class ChainHead(KeepsRotaryFloat32, DraftModule):
    """The trainable part of a chain-pathway `DraftStudent`: the fuse Linear and the head's blocks.

    model_config is the teacher's config: a kforcing `ModelConfig`, or a Hugging Face teacher's `HFModelConfig`
    (then the blocks are kforcing blocks of its shape, initialised fresh: there are no kforcing blocks to copy).
    """

    def __init__(self, model_config, config):
        super().__init__()
        if config.pathway != "chain":
            raise ValueError(f"a ChainHead is the 'chain' pathway; this HeadConfig has pathway={config.pathway!r} "
                             "(build it with build_head or DraftStudent.from_teacher)")
        if config.readout != "categorical":
            raise ValueError(f"the chain pathway drafts from distributions (readout 'categorical'), got readout "
                             f"{config.readout!r}")
        if config.num_layers > model_config.n_layer:
            raise ValueError(f"a chain head of {config.num_layers} layers cannot be copied from a teacher of "
                             f"{model_config.n_layer} layers")
        self.config, self.model_config = config, model_config
        self.teacher_fingerprint: Optional[str] = None  # set by DraftStudent: the teacher these weights belong to
        blocks = block_config(model_config, config.num_layers)
        width = model_config.n_embd
        self.fuse = DecodeLinear(2 * width, width, bias=False)
        self.blocks = nn.ModuleList(Block(blocks) for _ in range(config.num_layers))
        self._rotary = (blocks.head_dim, blocks.rope_base)  # the head's own rotary frequencies
        self.register_buffer("inv_freq", rotary_inv_freq(*self._rotary), persistent=False)
        if config.draft_vocab is not None:
            if config.draft_vocab > model_config.vocab_size:
                raise ValueError(f"draft_vocab={config.draft_vocab} is larger than the teacher's vocabulary "
                                 f"({model_config.vocab_size} tokens)")
            # The draft vocabulary's token ids, ascending: a draft's CDF runs in the teacher's order, restricted.
            self.register_buffer("draft_ids", torch.arange(config.draft_vocab))
        self._readout = None  # (cache key, the teacher's LM head restricted to draft_ids) for decoding

    def set_draft_vocab(self, counts):
        """Make the draft vocabulary the config.draft_vocab tokens with the largest `counts` (V,)."""
        top = torch.topk(torch.as_tensor(counts, dtype=torch.float64), self.config.draft_vocab).indices
        self.draft_ids.copy_(top.sort().values.to(self.draft_ids.device))

    @property
    def weight_dtype(self):
        """The dtype the head's linear weights are stored in: its activations' dtype, or bfloat16 after
        `kforcing.models.transformer.cast_linear_weights(head, torch.bfloat16)` (drafting reads half the bytes; drafts
        only propose, so verification stays exact). The drafts' readout is stored in it too."""
        return self.fuse.weight.dtype

    def readout(self, teacher, features):
        """Draft logits (..., N) of head features (..., H): the teacher's final norm and LM head, over the draft
        vocabulary (N = draft_vocab: the restricted LM head reads N / V of the LM head's bytes) or the whole one,
        read from a copy in `weight_dtype` when that differs from the teacher's."""
        return self.apply_readout(teacher, self.readout_layer(teacher), features)

    def apply_readout(self, teacher, layer, features):
        """`readout` with the LM head `layer` from `readout_layer` (None: the teacher's own): what a compiled
        decoding round calls, with the layer looked up once before it (the lookup compares storage addresses,
        which torch.compile cannot trace)."""
        if layer is None:
            return teacher.logits(features)
        norm, _ = teacher.output_layers()
        return layer(norm(features))

    def readout_layer(self, teacher) -> Optional[nn.Module]:
        """The LM head the drafts' readout reads: None for the teacher's own (the whole vocabulary, same dtype),
        else a copy of its draft-vocabulary rows in `weight_dtype`, built once per teacher, vocabulary and dtype."""
        _, lm_head = teacher.output_layers()
        weight, bias = lm_head.weight, lm_head.bias
        if self.config.draft_vocab is None and weight.dtype == self.weight_dtype:
            return None
        ids = self.draft_ids if self.config.draft_vocab is not None else None
        key = (weight.data_ptr(), weight._version, weight.dtype, self.weight_dtype,
               None if ids is None else (ids.data_ptr(), ids._version))
        if self._readout is None or self._readout[0] != key:
            rows = weight if ids is None else weight[ids]
            linear = DecodeLinear(weight.shape[1], rows.shape[0], bias=bias is not None, device=weight.device,
                                  dtype=self.weight_dtype).requires_grad_(False)
            with torch.no_grad():
                linear.weight.copy_(rows)
                if bias is not None:
                    linear.bias.copy_(bias if ids is None else bias[ids])
            self._readout = (key, linear)
        return self._readout[1]

    def token_ids(self, index):
        """Token ids of readout indices."""
        return index if self.config.draft_vocab is None else self.draft_ids[index]

    def full_distribution(self, probabilities):
        """(..., V) probabilities of readout probabilities (..., N): zero outside the draft vocabulary."""
        if self.config.draft_vocab is None:
            return probabilities
        full = probabilities.new_zeros(*probabilities.shape[:-1], self.model_config.vocab_size)
        return full.index_copy_(-1, self.draft_ids, probabilities)

    @classmethod
    def from_teacher(cls, teacher, config):
        """A head whose fuse starts as [I | I] / 2 (the blocks first see the mean of the feature and the next token's
        embedding) and whose blocks start as copies of a kforcing teacher's last blocks; for a Hugging Face teacher,
        as blocks that add nothing yet (weights N(0, 0.02), output projections zero)."""
        head = cls(teacher.config, config).to(device=teacher.device, dtype=teacher.dtype)
        if isinstance(teacher.config, ModelConfig):
            for mine, theirs in zip(head.blocks, teacher.blocks[-config.num_layers:]):
                mine.load_state_dict(theirs.state_dict())
        else:
            with torch.no_grad():
                for block in head.blocks:
                    for module in block.modules():
                        if isinstance(module, nn.Linear):
                            nn.init.normal_(module.weight, std=0.02)
                    block.attn.wo.weight.zero_()
                    block.mlp.proj.weight.zero_()
        width = teacher.config.n_embd
        with torch.no_grad():
            eye = torch.eye(width, device=head.fuse.weight.device, dtype=head.fuse.weight.dtype) / 2
            head.fuse.weight.copy_(torch.cat([eye, eye], dim=1))
        return head

    def rows(self, teacher, features, next_tokens):
        """The head's input rows (B, S, H): fuse([features | embeddings of the tokens that follow them])."""
        return self.fuse(torch.cat([features, teacher.embed(next_tokens).to(features.dtype)], dim=-1))

    def forward_train(self, teacher, features, ids):
        """Teacher-forced head features (B, N-1, H) over a context: row p reads (F_p, ids[p+1]) at position p and
        its output stands for the teacher's feature at p+1 (the distribution of ids[p+2])."""
        return self.run_rows(self.rows(teacher, features[:, :-1], ids[:, 1:]))

    def run_rows(self, x):
        """The head's blocks over input rows x (B, S, H) at positions 0..S-1, causally (training layout)."""
        positions = torch.arange(x.shape[1], device=x.device)
        return run_blocks(self.blocks, x, positions, self.inv_freq,
                          lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, 0, 1))

    def decode(self, teacher, features, next_tokens, cache, n_commit):
        """One head call in decoding: rows (F, token) (B, T) at slots cache.seqlens + 0..T-1 -> features (B, T, H);
        the first n_commit rows are appended to the head's cache."""
        return decode_blocks(self.blocks, self.rows(teacher, features, next_tokens), cache, n_commit,
                             self.inv_freq)


__all__ = ["ChainHead", "FEATURE_LOSS_WEIGHT"]
