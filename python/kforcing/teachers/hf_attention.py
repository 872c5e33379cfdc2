"""kforcing's attention as a transformers attention function: `attn_implementation="kforcing"`.

A Hugging Face model loaded with attn_implementation="kforcing" hands every attention call to
`kforcing_attention`, registered in transformers' attention-function registry (`AttentionInterface`), so no module
of the model is patched. The model's own layers still compute q, k, v (with their biases, RoPE or learned
positions, GQA head counts); the attention itself is the `attend(layer, q, k, v)` callback of the caller, passed
as the forward keyword `kforcing_attend`: transformers forwards unknown attention keywords from the model's forward
down to the attention function. The callback sees kforcing's layout (B, S, heads, D) and chooses the mask and the
keys: `kforcing_ops.window_attention` for a staircase of windows, `kforcing_ops.window_attention_decode` against a
`kforcing.models.transformer.KVCache`, or any other function of `kforcing.models.transformer.run_blocks`' callbacks.

transformers' own mask is not built for this implementation (its mask registry has no "kforcing" entry, so the
model passes attention_mask=None): the callback is the mask.
"""

import torch

ATTENTION_NAME = "kforcing"
ATTEND_KWARG = "kforcing_attend"


def kforcing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The transformers attention function: q (B, heads, S, D), k/v (B, kv_heads, S, D) -> ((B, S, heads, D), None).

    The layer index is the attention module's `layer_idx`; `kwargs[ATTEND_KWARG]` is the caller's callback.
    """
    attend = kwargs.get(ATTEND_KWARG)
    if attend is None:
        raise RuntimeError(f"a model loaded with attn_implementation={ATTENTION_NAME!r} must be run through "
                           f"kforcing (kforcing.teachers.hf_teacher.HFTeacher), which passes its attention as "
                           f"`{ATTEND_KWARG}`; load the model with attn_implementation='sdpa' to use it on its own")
    if dropout:
        raise ValueError(f"attention dropout ({dropout}) is not supported by kforcing's attention: put the model in "
                         "eval mode (a kforcing teacher is frozen)")
    head_dim = query.shape[-1]
    if scaling is not None and abs(scaling * head_dim ** 0.5 - 1.0) > 1e-6:
        raise ValueError(f"layer {module.layer_idx} scales attention scores by {scaling}, but kforcing's attention "
                         f"uses 1/sqrt(head_dim) = {head_dim ** -0.5}")
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by kforcing's attention")
    query, key, value = _autocast(query, key, value)
    out = attend(module.layer_idx, query.transpose(1, 2).contiguous(), key.transpose(1, 2).contiguous(),
                 value.transpose(1, 2).contiguous())
    return out, None


def _autocast(*tensors):
    """Under autocast, q, k and v in its dtype, as torch's SDPA takes them there: a model's rotary embedding can
    return q and k in float32 while v comes out of an autocast linear layer in bf16."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def register_attention():
    """Register `kforcing_attention` as attn_implementation="kforcing" (idempotent); needs transformers."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kforcing_attention)


__all__ = ["ATTEND_KWARG", "ATTENTION_NAME", "kforcing_attention", "register_attention"]
