"""The kforcing chain head inside vLLM: the model class vLLM's `eagle` speculative method runs as its drafter.

The checkpoint is the one `kforcing.serving.vllm_export` writes (its docstring is the format); this module computes
exactly what `kforcing.students.draft.chain_head.ChainHead` computes for a Hugging Face teacher:

    row p = fc([tok_emb(token at p+1) | F_p])      F_p: the target's final hidden state at p, after its final norm
    x     = row p
    for each block:                                 kforcing blocks (kforcing.models.transformer.Block)
        x = x + o(attend(rotary(qkv(LayerNorm(x)))))     causal, grouped-query, scale 1/sqrt(head_dim), at position p
        x = x + proj(gelu(fc(LayerNorm(x))))             exact (erf) GELU; LayerNorm without bias; no biases anywhere
    f_p   = x                                       the draft logits are lm_head(f_p), the next row's feature is f_p

vLLM's EAGLE-1 proposer (vllm/v1/spec_decode/llm_base_proposer.py, and v1/worker/gpu/spec_decode/eagle for the
second model runner) already drives that loop: it pairs the target's hidden state at p with the token at p+1 at
position p, keeps the drafter's keys and values in its paged KV cache, feeds the drafter's output back as the next
row's hidden state, and verifies the drafts. What the proposer needs from the model:

    forward(input_ids, positions, hidden_states, inputs_embeds=None) -> (states for logits, states for the next row)
    compute_logits(states) -> full-vocabulary logits;  embed_input_ids(ids);  load_weights(weights)
    model.embed_tokens and lm_head, which the proposer replaces by the target's own once both are loaded
    (has_own_embed_tokens = has_own_lm_head = False: the export writes neither, the head reads the teacher's)
    vLLM Attention layers whose names carry layer ids after the target's, so the drafter gets KV cache of its own

Why not vLLM's stock EAGLE-1 Llama head (vllm/model_executor/models/llama_eagle.py): its blocks are Llama blocks
(RMSNorm, SiLU-gated MLP, separate q/k/v) and its first block skips the input norm; kforcing's blocks use a LayerNorm
without bias before both branches of every block, a plain GELU MLP and one fused q/k/v projection, and their
output is read by the LM head without a final norm (the teacher's final norm is already inside F_p). A chain head
may also draft from a smaller vocabulary (`draft_vocab`): then only those rows of the LM head are computed and every
other token gets -inf, so a draft can never be outside it (vLLM still verifies every draft against the target).

The linears and the attention are vLLM's tensor-parallel layers, so the head splits over ranks as the target does
(tested on one rank only); the draft-vocabulary shortcut needs the whole LM head on one rank, and otherwise masks the
full logits instead.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsEagle
from vllm.model_executor.models.utils import maybe_prefix

from .vllm_format import FORMAT_VERSION, LAYER_NORM_EPS


def _kforcing_section(config) -> dict:
    """config.json's "kforcing" section, checked against what this module implements."""
    section = getattr(config, "kforcing", None)
    if not isinstance(section, dict):
        raise ValueError("this drafter's config.json has no \"kforcing\" section: write it with "
                         "`kforcing export-vllm` (kforcing.serving.vllm_export)")
    expected = {"format": FORMAT_VERSION, "norm": "layernorm", "mlp": "gelu", "rope": "neox"}
    wrong = {key: section.get(key) for key, value in expected.items() if section.get(key) != value}
    if wrong:
        raise ValueError(f"this kforcing drafter has {wrong}; this vLLM module serves {expected}: export it again "
                         "with the kforcing that serves it")
    return section


class _FromTarget(nn.Module):
    """Stands in for the target's embedding or LM head until the proposer puts the target's own in its place
    (llm_base_proposer.py `_maybe_share_embeddings` / `_maybe_share_lm_head`, which look at `weight`'s width).
    A chain head has no copy of either: it is trained on the teacher's, and the export writes neither."""

    def __init__(self, what: str, width: int):
        super().__init__()
        self.what = what
        self.register_buffer("weight", torch.empty(0, width), persistent=False)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"the kforcing chain head reads the target model's {self.what}, and vLLM did not share "
                           "it with the drafter (it does not under pipeline parallelism)")


class ChainAttention(nn.Module):
    """kforcing's Attention: one fused q/k/v projection (q heads, then k heads, then v heads), half-split ("neox")
    rotary embeddings of base rope_theta at the row's position, causal grouped-query attention over vLLM's paged KV
    cache, then the output projection."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias=False,
                                     prefix=f"{prefix}.qkv", return_bias=False)
        self.o = RowParallelLinear(heads * head_dim, config.hidden_size, bias=False, prefix=f"{prefix}.o",
                                   return_bias=False)
        self.q_size = self.qkv.num_heads * head_dim  # this rank's share
        self.kv_size = self.qkv.num_kv_heads * head_dim
        # Plain rotary frequencies rope_theta^(-2i/head_dim), whatever scaling the teacher's own rotary uses: that is
        # what the head was trained with (kforcing.models.transformer.rotary_inv_freq).
        self.rotary_emb = get_rope(head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(config)})
        self.attn = Attention(self.qkv.num_heads, head_dim, head_dim ** -0.5, num_kv_heads=self.qkv.num_kv_heads,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o(self.attn(q, k, v))


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class ChainMLP(nn.Module):
    """kforcing's MLP: fc, exact GELU, proj."""

    def __init__(self, config, prefix: str):
        super().__init__()
        self.fc = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=False,
                                       prefix=f"{prefix}.fc", return_bias=False)
        self.proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                      prefix=f"{prefix}.proj", return_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class ChainBlock(nn.Module):
    """kforcing's Block (pre-norm, both norms LayerNorm without bias): x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config, eps: float, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=eps, bias=False)
        self.attn = ChainAttention(config, vllm_config, prefix=f"{prefix}.attn")
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=eps, bias=False)
        self.mlp = ChainMLP(config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(positions, self.norm1(x))
        return x + self.mlp(self.norm2(x))


@support_torch_compile
class ChainHeadModel(nn.Module):
    """The head's rows and blocks; parameter names are the checkpoint's (fc.weight, layers.{i}.*)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", first_layer_id: int = 0):
        super().__init__()
        config = vllm_config.speculative_config.draft_model_config.hf_config
        eps = float(_kforcing_section(config).get("norm_eps", LAYER_NORM_EPS))
        self.embed_tokens = _FromTarget("input embedding", config.hidden_size)
        self.fc = ReplicatedLinear(2 * config.hidden_size, config.hidden_size, bias=False,
                                   prefix=maybe_prefix(prefix, "fc"), return_bias=False)
        # vLLM finds the drafter's attention layers by name, and its KV cache indexes them by the layer id in the
        # name: the head's ids follow the target's (layer i of the head is named layers.{first_layer_id + i}).
        self.layers = nn.ModuleList(
            ChainBlock(config, eps, vllm_config, prefix=maybe_prefix(prefix, f"layers.{first_layer_id + i}"))
            for i in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # The export already put fc's columns in EAGLE's order [embedding | feature] (kforcing's fuse reads
        # [feature | embedding]).
        x = self.fc(torch.cat([inputs_embeds, hidden_states], dim=-1))
        for layer in self.layers:
            x = layer(positions, x)
        return x


class KForcingChainHeadForCausalLM(nn.Module, SupportsEagle):
    """A kforcing chain head served as vLLM's EAGLE-1 drafter (module docstring)."""

    # The head reads the target's embedding and LM head: the proposer shares both (llm_base_proposer.py).
    has_own_embed_tokens = False
    has_own_lm_head = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.speculative_config.draft_model_config.hf_config
        section = _kforcing_section(config)
        target = vllm_config.model_config
        family = section.get("teacher_family")
        if family is not None and target.hf_text_config.model_type != family:
            raise ValueError(f"this kforcing drafter was distilled from a {family!r} model, but vLLM serves a "
                             f"{target.hf_text_config.model_type!r} model as the target")
        if target.get_hidden_size() != config.hidden_size:
            raise ValueError(f"this kforcing drafter is {config.hidden_size} wide and reads the target's hidden "
                             f"states, but the target is {target.get_hidden_size()} wide")
        self.config = config
        self.model = ChainHeadModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                    first_layer_id=target.get_num_layers(vllm_config.parallel_config))
        self.lm_head = _FromTarget("LM head", config.hidden_size)
        # The head's logits are the teacher's LM head of its features, with no scale or cap of its own.
        self.vocab_size = target.get_vocab_size()
        self.logits_processor = LogitsProcessor(self.vocab_size)
        draft_vocab = section.get("draft_vocab")
        # draft_ids: the token ids of the draft vocabulary (loaded from the checkpoint), or None for all of them.
        self.register_buffer("draft_ids", None if draft_vocab is None else torch.zeros(draft_vocab, dtype=torch.long),
                             persistent=False)
        self._draft_rows = None  # (the LM head weight they were cut from, its draft_ids rows)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model(input_ids, positions, hidden_states, inputs_embeds)
        # The same feature is read out (compute_logits) and fed to the next row: kforcing's chain has no final norm.
        return features, features

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.draft_ids is None:
            return self.logits_processor(self.lm_head, hidden_states)
        weight = getattr(self.lm_head, "weight", None)
        if (get_tensor_model_parallel_world_size() == 1 and isinstance(weight, torch.Tensor)
                and weight.is_floating_point() and weight.shape[0] >= self.vocab_size):
            # Only the draft vocabulary's rows of the LM head (N / V of its work), cut once per LM head tensor (a
            # reload that writes into the same tensor in place is not seen).
            if self._draft_rows is None or self._draft_rows[0] is not weight:
                self._draft_rows = (weight, weight[self.draft_ids].contiguous())
            bias = getattr(self.lm_head, "bias", None)
            draft = F.linear(hidden_states.to(weight.dtype), self._draft_rows[1],
                             None if bias is None else bias[self.draft_ids])
        else:
            # A vocabulary-parallel or quantized LM head: compute the whole vocabulary, keep the draft tokens'.
            full = self.logits_processor(self.lm_head, hidden_states)
            if full is None:  # the gather leaves ranks other than the first without logits
                return None
            draft = full[:, self.draft_ids]
        # Every token outside the draft vocabulary gets -inf: it is never drafted, and has draft probability 0.
        logits = draft.new_full((draft.shape[0], self.vocab_size), float("-inf"))
        return logits.index_copy_(1, self.draft_ids, draft)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name == "draft_ids":
                if self.draft_ids is None or tensor.shape != self.draft_ids.shape:
                    raise ValueError(f"the checkpoint's draft_ids {tuple(tensor.shape)} do not match config.json's "
                                     f"draft_vocab {self.config.kforcing.get('draft_vocab')}")
                if not 0 <= int(tensor.min()) <= int(tensor.max()) < self.vocab_size:
                    raise ValueError(f"the checkpoint's draft_ids fall outside the target's {self.vocab_size} tokens")
                self.draft_ids.copy_(tensor)
                loaded.add(name)
                continue
            param = params.get(f"model.{name}")
            if param is None:
                raise ValueError(f"unexpected tensor {name!r} in a kforcing chain head checkpoint (its names are "
                                 "fc.weight, layers.{i}.*, draft_ids; the embedding and LM head are the target's)")
            if name.endswith(".attn.qkv.weight"):
                # The fused projection's rows are q heads, then k heads, then v heads; vLLM's QKV layer loads each
                # part into this rank's share.
                layer = self.get_submodule(f"model.{name.removesuffix('.weight')}")
                sizes = [layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size,
                         layer.total_num_kv_heads * layer.head_size]
                if tensor.shape[0] != sum(sizes):
                    raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {sum(sizes)} (q, k, v heads)")
                for part, shard in zip(tensor.split(sizes, dim=0), ("q", "k", "v")):
                    param.weight_loader(param, part, shard)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(f"model.{name}")
        if self.draft_ids is not None and "draft_ids" not in loaded:
            raise ValueError("config.json names a draft vocabulary but the checkpoint has no draft_ids")
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"the kforcing chain head checkpoint lacks {sorted(missing)}")
        return loaded


__all__ = ["KForcingChainHeadForCausalLM"]
