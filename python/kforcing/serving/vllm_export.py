"""A chain-pathway draft student of a Hugging Face teacher, written as a checkpoint vLLM serves as its EAGLE drafter.

Why EAGLE's slot: a chain head (`kforcing.students.draft.chain_head`) is, for a Hugging Face teacher, the shape
vLLM's `eagle` speculative method drives. Row p of the head reads the teacher's final hidden state at p (after the
model's final norm: what vLLM hands an EAGLE drafter) and the embedding of the token at p+1, at rotary position
p; its output feature is both read out by the teacher's LM head (no norm between: the teacher's final norm is
inside its features) and fed back as the next draft row's feature. vLLM keeps the head's KV cache in its paged
memory, batches it with every request, and verifies the drafts with its rejection sampler; the module that
computes the head inside vLLM is `kforcing.serving.vllm_model` (registered by `kforcing.serving.vllm_plugin`).

What differs from a stock EAGLE head, and why the checkpoint names its own architecture (KForcingChainHead): the
head's blocks are kforcing blocks (LayerNorm without bias, GELU MLP, one fused q/k/v projection), with the input
norm the stock EAGLE head drops, and a draft vocabulary may restrict the readout.

The directory (`export_vllm_head`):

    config.json         a Llama-style config vLLM's loader parses (model_type "llama", the head's shape), with
                        architectures ["KForcingChainHead"] and a "kforcing" section (format, norm, MLP, draft
                        vocabulary, the teacher's fingerprint)
    model.safetensors   fc.weight (H, 2H), columns [token embedding | feature] (EAGLE's order; kforcing's fuse
                        reads [feature | embedding]); layers.{i}.norm1.weight, layers.{i}.attn.qkv.weight,
                        layers.{i}.attn.o.weight, layers.{i}.norm2.weight, layers.{i}.mlp.fc.weight,
                        layers.{i}.mlp.proj.weight; draft_ids (N,) int64 with a draft vocabulary. The embedding and
                        the LM head are the teacher's own (vLLM shares the target's).
"""

import json
from pathlib import Path

import torch

from ..students.draft.student import DraftStudent
from ..teachers.hf_teacher import HFTeacher
from .vllm_format import ARCHITECTURE, FORMAT_VERSION, LAYER_NORM_EPS, SERVED_FAMILIES


def _check_servable(student: DraftStudent):
    if not isinstance(student, DraftStudent):
        raise TypeError(f"export_vllm_head needs a DraftStudent, got {type(student).__name__}")
    if student.pathway != "chain":
        raise ValueError(f"vLLM serves a chain-pathway student as its EAGLE drafter; this student's pathway is "
                         f"{student.pathway!r} (distill with --pathway chain, the default)")
    teacher = student.teacher
    if not isinstance(teacher, HFTeacher):
        raise ValueError("vLLM serves Hugging Face teachers: this student's teacher is a kforcing ARModel, which vLLM "
                         "cannot load (distil a Hugging Face model with `kforcing distill --teacher hf:PATH`)")
    family = teacher.config.model_type
    if family not in SERVED_FAMILIES:
        raise ValueError(f"the teacher is a {family!r} model; vLLM's EAGLE drafting is exported for the "
                         f"{', '.join(SERVED_FAMILIES)} families only")


def vllm_head_tensors(student: DraftStudent) -> dict:
    """The head's weights under the names of the exported checkpoint (module docstring), on the CPU, contiguous."""
    head = student.head
    width = student.teacher.config.n_embd
    fuse = head.fuse.weight.detach()
    tensors = {"fc.weight": torch.cat([fuse[:, width:], fuse[:, :width]], dim=1)}  # [embedding | feature]
    for i, block in enumerate(head.blocks):
        tensors.update({
            f"layers.{i}.norm1.weight": block.norm1.weight,
            f"layers.{i}.attn.qkv.weight": block.attn.wqkv.weight,
            f"layers.{i}.attn.o.weight": block.attn.wo.weight,
            f"layers.{i}.norm2.weight": block.norm2.weight,
            f"layers.{i}.mlp.fc.weight": block.mlp.fc.weight,
            f"layers.{i}.mlp.proj.weight": block.mlp.proj.weight,
        })
    if head.config.draft_vocab is not None:
        tensors["draft_ids"] = head.draft_ids
    return {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}


def vllm_head_config(student: DraftStudent) -> dict:
    """config.json of the exported checkpoint (module docstring)."""
    head, teacher = student.head, student.teacher
    blocks = head.blocks[0]
    config = teacher.config
    hf_config = teacher.model.config
    dtype = str(head.fuse.weight.dtype).removeprefix("torch.")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.n_embd,
        "num_attention_heads": blocks.attn.n_head,
        "num_key_value_heads": blocks.attn.n_kv_head,
        "head_dim": blocks.attn.head_dim,
        "num_hidden_layers": len(head.blocks),
        "intermediate_size": blocks.mlp.fc.weight.shape[0],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": hf_config.max_position_embeddings,
        "rope_theta": float(head._rotary[1]),
        "rms_norm_eps": LAYER_NORM_EPS,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": hf_config.bos_token_id,
        "eos_token_id": hf_config.eos_token_id,
        "kforcing": {
            "format": FORMAT_VERSION,
            "norm": "layernorm",
            "norm_eps": LAYER_NORM_EPS,
            "mlp": "gelu",
            "rope": "neox",
            "draft_vocab": head.config.draft_vocab,
            "max_k": head.config.max_k,
            "teacher_fingerprint": student.fingerprint,
            "teacher_family": config.model_type,
        },
    }


def export_vllm_head(student: DraftStudent, directory) -> Path:
    """Write `student` (chain pathway, Hugging Face teacher) as a vLLM EAGLE drafter checkpoint in `directory`
    (created; files already there are replaced). Returns the directory."""
    from safetensors.torch import save_file

    _check_servable(student)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(vllm_head_tensors(student), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(vllm_head_config(student), indent=2) + "\n")
    return directory


__all__ = ["export_vllm_head", "vllm_head_config", "vllm_head_tensors"]
