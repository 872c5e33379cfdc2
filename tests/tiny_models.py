"""Tiny random teacher/student pairs shared by the metric and evaluation tests."""

import torch

from kforcing.model import ARModel, ModelConfig, PushForwardLM

CONFIG = ModelConfig.from_preset("tiny", vocab_size=300, max_seq_len=64)


def diverse_student(config, max_k):
    """An untrained student whose tokens depend strongly on context and noise (weights at 2 / sqrt(fan_in)), so
    that comparisons with it are not satisfied by a constant output."""
    student = PushForwardLM(config, max_k).eval()
    with torch.no_grad():
        for p in student.parameters():
            if p.dim() >= 2:
                p.normal_(std=2.0 / p.shape[1] ** 0.5)
        student.tok_emb.weight.normal_(std=1.0)
    return student


def models(seed=0, max_k=4):
    """(teacher, student): a peaked random teacher and a `diverse_student`."""
    torch.manual_seed(seed)
    teacher = ARModel(CONFIG).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)
    return teacher, diverse_student(CONFIG, max_k)
