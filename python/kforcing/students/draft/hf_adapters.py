"""The trunk pathway on a Hugging Face teacher: row-gated LoRA adapters on the model's own linear layers.

As `kforcing.students.draft.trunk_adapters.TrunkAdapters` does for kforcing's own blocks (docs/method.md §8), the window
rows [y1 | hints] run through every layer of the frozen teacher; token rows with the teacher's weights, hint rows with
a rank-r LoRA (W x + B A x) on every linear layer the family names (`kforcing.teachers.hf_teacher.FAMILIES`: q/k/v and
output projections, every MLP projection; GPT-2's fused q/k/v projection gets one adapter per q, k and v). After the
last layer, hint rows take a trainable copy of the model's final norm; token rows its own.

How they wrap the model's layers: for the duration of one `run`, a forward hook on each adapted module adds B A input
to its output on the hint rows, computing the LoRA on those rows alone (and the final norm's output on hint rows is
the copy's), while token rows keep the outputs exactly as the module computed them, so their logits stay the
teacher's bit for bit. Outside `run` the model carries no hook, and its modules are never replaced: the teacher's
state dict, fingerprint and behaviour are untouched, and only these adapters are saved.

Only LoRA adapters (adapter_rank >= 1): full trainable copies (adapter_rank = 0) exist for kforcing's own blocks.
"""

import contextlib
import copy
import dataclasses
import functools

import torch
from torch import nn

from kforcing_ops.nn import NoiseEmbedding

from ...teachers.hf_teacher import HFTeacher, linear_features
from .draft_module import DraftModule
from .trunk_adapters import GatedLoRALinear


def _key(path: str) -> str:
    """A module path as a ModuleDict key ("self_attn.q_proj" -> "self_attn_q_proj")."""
    return path.replace(".", "_")


def _lora_hook(adapter, hint_index, module, inputs, output):
    """The module's output, plus the LoRA's B A x on the hint rows, computed on those rows alone."""
    return output.index_add(-2, hint_index, adapter.delta(inputs[0].index_select(-2, hint_index)))


def _norm_hook(norm, hint_index, module, inputs, output):
    """The teacher's norm on token rows, the adapters' own norm on the hint rows (computed on those alone)."""
    return output.index_copy(-2, hint_index, norm(inputs[0].index_select(-2, hint_index)))


class HFTrunkAdapters(DraftModule):
    """The trainable part of a trunk-pathway `DraftStudent` on an `HFTeacher`: per-layer LoRA adapters, the final
    norm of hint rows and the noise encoder (see the module docstring). `config.adapter_rank` None means
    DEFAULT_RANK, and `self.config` records the rank used."""

    # A LoRA, never a full copy: a copy of every block would double a pretrained model's memory and checkpoint.
    # Rank 8 is the smallest rank the ablation measured (bench/results/ablation_draft_cpu); on the demo's model
    # more capacity drafted better (rank 32, then a full copy), so a large model may deserve --adapter-rank 32-128.
    DEFAULT_RANK = 8

    def __init__(self, teacher: HFTeacher, config):
        super().__init__()
        if config.pathway != "trunk":
            raise ValueError(f"a Hugging Face teacher supports the 'trunk' pathway only (the 'head' pathway copies "
                             f"kforcing's own blocks); this HeadConfig has pathway={config.pathway!r}")
        if config.adapter_rank is None:
            config = dataclasses.replace(config, adapter_rank=self.DEFAULT_RANK)
        rank, width = config.adapter_rank, teacher.config.n_embd
        if rank < 1:
            raise ValueError(f"HeadConfig.adapter_rank={rank}: a Hugging Face teacher takes LoRA adapters only "
                             "(adapter_rank >= 1); full copies (0) are for kforcing's own models")
        if rank > width:
            raise ValueError(f"HeadConfig.adapter_rank={rank} is larger than the model width {width}: a LoRA rank "
                             f"must be <= {width}")
        self.config, self.model_config = config, teacher.config
        self.teacher_fingerprint = None  # set by DraftStudent: the teacher these weights belong to
        fused = teacher.family.fused_qkv
        layers = []
        for linears in teacher.adapted_linears():
            adapters = nn.ModuleDict()
            for path, module in linears.items():
                fan_in, fan_out = linear_features(module)
                splits = [fan_out // 3] * 3 if path == fused else [fan_out]
                adapters[_key(path)] = GatedLoRALinear(fan_in, splits, rank)
            layers.append(adapters)
        self.layers = nn.ModuleList(layers)
        self.norm = copy.deepcopy(teacher.final_norm()).requires_grad_(True)
        self.noise = NoiseEmbedding(width, num_freqs=config.noise_num_freqs, code=config.noise_code)

    @classmethod
    def blank(cls, teacher: HFTeacher, config):
        """Untrained adapters for `teacher` (their weights are about to be loaded from a checkpoint)."""
        return cls(teacher, config)

    @classmethod
    def from_teacher(cls, teacher: HFTeacher, config):
        """Adapters that start as the teacher (B = 0; the final norm a copy of the teacher's)."""
        return cls(teacher, config).to(device=teacher.device, dtype=teacher.dtype)

    @contextlib.contextmanager
    def _wrapped(self, teacher: HFTeacher, hint_index):
        """The teacher's adapted modules and final norm, hooked for one run; hint_index (H,) int64: the rows (of
        dim -2) that are hint rows."""
        handles = []
        try:
            for linears, adapters in zip(teacher.adapted_linears(), self.layers):
                for path, module in linears.items():
                    hook = functools.partial(_lora_hook, adapters[_key(path)], hint_index)
                    handles.append(module.register_forward_hook(hook))
            handles.append(teacher.final_norm().register_forward_hook(functools.partial(_norm_hook, self.norm,
                                                                                        hint_index)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def run(self, teacher: HFTeacher, x, positions, attend, n_token=1):
        """Window rows x (B, W, R, H) through the teacher with these adapters -> normed hidden states (B, W, R, H).

        The first n_token rows of each window are token rows. positions: rotary/absolute positions of the
        flattened rows, (W*R,) or (B, W*R); attend(layer, q, k, v) computes each layer's attention for them.
        """
        if len(self.layers) != teacher.config.n_layer:
            raise ValueError(f"these adapters are for {len(self.layers)} layers, the teacher has "
                             f"{teacher.config.n_layer}")
        batch, windows, rows, _ = x.shape
        # Rows w * R + n_token .. w * R + R - 1 of every window w (arithmetic: no host sync).
        hint_index = (torch.arange(windows, device=x.device)[:, None] * rows
                      + torch.arange(n_token, rows, device=x.device)).flatten()
        with self._wrapped(teacher, hint_index):
            hidden = teacher.run_layers(x.flatten(1, 2), positions, attend)
        return hidden.view(batch, windows, rows, -1)

    def readout(self, teacher: HFTeacher, hidden, n_token):
        """Logits of `run`'s output rows (..., R, H): the final norms were applied in `run`; the LM head."""
        return teacher.logits(hidden)


__all__ = ["HFTrunkAdapters"]
