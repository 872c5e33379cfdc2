"""Tiny random teacher/student pairs shared by the metric, evaluation and draft-student tests."""

import torch

from kforcing.students.draft.student import DraftStudent, HeadConfig
from kforcing.models.transformer import ARModel, ModelConfig
from kforcing.students.push_forward.model import PushForwardLM

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


# A teacher small enough to decode a ragged batch with a draft student in well under a second on one CPU core.
DRAFT_CONFIG = ModelConfig(vocab_size=97, n_layer=3, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=96)


def peaked_teacher(seed=0, config=DRAFT_CONFIG):
    """A random ARModel with a peaked, varied next-token distribution (LM head x 40), so drafts are sometimes right."""
    torch.manual_seed(seed)
    model = ARModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def draft_student(teacher, head_config: HeadConfig, seed=1, scale=0.05):
    """A DraftStudent of `teacher` whose trainable parameters are moved off their initialisation by
    scale * N(0, 1) (LoRA B included, so adapters are non-zero): an untrained student that is not the teacher."""
    student = DraftStudent.from_teacher(teacher, head_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in student.head.parameters():
            p.add_(scale * torch.randn_like(p))
    return student.eval()


def trained_teacher(root, steps=150):
    """A tiny AR teacher run trained for `steps` steps on 0.5 MB of the default corpus (vocab 512), in root/teacher:
    about a minute on two CPU cores at the default 150 steps."""
    from kforcing.data import iter_documents, train_tokenizer
    from kforcing.training.train import TrainConfig, train_teacher

    texts = [text for _, text in iter_documents("stdlib", max_bytes=500_000)]
    tokenizer_path = train_tokenizer(texts, vocab_size=512).save(root)
    config = TrainConfig(out_dir=str(root / "teacher"), preset="tiny", corpus=["stdlib"], corpus_max_bytes=500_000,
                         tokenizer=str(tokenizer_path), seq_len=64, batch_size=16, steps=steps,
                         warmup_steps=steps // 10, eval_interval=steps, eval_batches=2, save_interval=steps,
                         log_interval=50, progress=False, device="cpu")
    train_teacher(config)
    return root / "teacher"
