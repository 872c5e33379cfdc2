"""The teacher protocol: what the draft student, decoding and evaluation need of a teacher (docs/method.md §9).

Two classes implement it: kforcing's own `kforcing.models.transformer.ARModel` and
`kforcing.teachers.hf_teacher.HFTeacher` (a Hugging Face causal LM). Both are frozen nn.Modules with

    config                              vocab_size, n_layer, n_embd, n_head, n_kv_head, head_dim, max_seq_len
    device, dtype, num_params()
    embed(ids) -> x                     input vectors (B, S, H) of token ids
    run_layers(x, positions, attend)    every layer over input vectors at per-row positions; attend(layer, q, k,
                                        v) computes each layer's attention in kforcing's (B, S, heads, D) layout
                                        (the staircase mask in training, the static `KVCache` in decoding)
    logits(hidden)                      next-token logits of run_layers' output
    output_layers()                     (norm, lm_head) with logits(hidden) = lm_head(norm(hidden))
    forward(ids), decode(ids, cache, n_commit, logits)
    fingerprint_config()                what `teacher_fingerprint` hashes besides the weights

Token rows, hint rows and the KV cache are built from these calls only, so one training and one decoding code path
serve both.
"""

from ..models.transformer import ARModel, KVCache, decode_pass
from .hf_teacher import HFTeacher

TEACHER_TYPES = (ARModel, HFTeacher)


def is_teacher(model) -> bool:
    """Whether `model` implements the teacher protocol (an ARModel or an HFTeacher)."""
    return isinstance(model, TEACHER_TYPES)


def check_teacher(model, what: str):
    """Raise TypeError unless `model` is a teacher; `what` names the caller in the message."""
    if not is_teacher(model):
        raise TypeError(f"{what} needs a teacher (a kforcing ARModel or a kforcing.teachers.hf_teacher.HFTeacher), got "
                        f"{type(model).__name__}")


def decode_layers(teacher, x, cache: KVCache, n_commit: int):
    """One decode pass of input vectors x (B, T, H) through the teacher's layers against `cache` (advanced by
    n_commit): run_layers' output, before `teacher.logits`."""
    return decode_pass(teacher.run_layers, teacher.config.n_layer, x, cache, n_commit)


__all__ = ["TEACHER_TYPES", "check_teacher", "decode_layers", "is_teacher"]
