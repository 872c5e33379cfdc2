"""kforcing.evaluation.metrics: text statistics on hand-built cases, coupled agreement, perplexity, batch independence,
speed."""

import math

import pytest
import torch

from kforcing.data import train_tokenizer
from kforcing.workflows.evaluate import default_ks
from kforcing.decoding.generate import generate_ar, generate_kforcing
from kforcing.evaluation.metrics import (EvalError, agreement_from_tokens, check_compatible, distinct_n,
                                         longest_repeated_ngram, perplexity, text_statistics, unigram_entropy)
from kforcing.students.push_forward.evaluate import coupled_agreement, decode_speed, generate_samples, window_tokens
from kforcing.models.transformer import ARModel, ModelConfig
from kforcing.students.push_forward.model import PushForwardLM
from tolerances import PERPLEXITY_REL
from tiny_models import CONFIG, models

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")


# ---------------------------------------------------------------------------------------------------------
# Text statistics on hand-built token streams


def test_unigram_entropy_known_values():
    assert unigram_entropy([5] * 8) == 0.0
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))
    assert unigram_entropy([1, 1, 1, 2]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert unigram_entropy([]) == 0.0


def test_distinct_n_known_values():
    assert distinct_n([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) (2,1)
    assert distinct_n([1, 2, 1, 2, 1], 3) == pytest.approx(2 / 3)  # (1,2,1) (2,1,2) (1,2,1)
    assert distinct_n(list(range(10)), 2) == 1.0
    assert distinct_n([4] * 6, 3) == pytest.approx(1 / 4)
    assert distinct_n([1], 2) == 1.0


def test_longest_repeated_ngram_known_values():
    assert longest_repeated_ngram([1, 2, 3, 4]) == 0
    assert longest_repeated_ngram([1, 2, 3, 1, 2, 3]) == 3
    assert longest_repeated_ngram([7, 7, 7, 7]) == 3  # overlapping occurrences count: (7,7,7) at 0 and 1
    assert longest_repeated_ngram([1, 2, 9, 1, 2, 8, 5, 1, 2, 9]) == 3
    assert longest_repeated_ngram([5, 1, 5]) == 1
    assert longest_repeated_ngram([]) == 0
    stats = text_statistics([[1, 2, 3, 1, 2, 3], [4, 4, 4, 4]])
    assert stats["unigram_entropy"] == pytest.approx(math.log(3) / 2)
    assert stats["distinct_2"] == pytest.approx((3 / 5 + 1 / 3) / 2)
    assert stats["longest_repeat_mean"] == 3 and stats["longest_repeat_max"] == 3
    with pytest.raises(EvalError, match="at least one sample"):
        text_statistics([])


def test_agreement_from_tokens():
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    result = agreement_from_tokens(a, a.clone())
    assert result["per_offset"] == [1.0, 1.0, 1.0] and result["exact_match"] == 1.0 and result["windows"] == 4
    b = a.clone()
    b[0, 2] = 0  # one window wrong at offset 3
    b[1, 0] = 0  # one wrong at offset 1
    result = agreement_from_tokens(a, b)
    assert result["per_offset"] == [0.75, 1.0, 0.75] and result["exact_match"] == 0.5
    with pytest.raises(EvalError, match="one shape"):
        agreement_from_tokens(a, b[:, :2])


# ---------------------------------------------------------------------------------------------------------
# Models


def contexts_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    return [torch.randint(0, CONFIG.vocab_size, (m,), generator=g).tolist() for m in lengths]


def test_identical_teacher_and_student_agree_completely():
    _, student = models()
    contexts = contexts_of(20)
    for k in (1, 2, 4):
        result = coupled_agreement(student, student, contexts, k, seed=3, batch_size=7)
        assert result["per_offset"] == [1.0] * k and result["exact_match"] == 1.0 and result["windows"] == 20


def test_coupled_agreement_compares_the_coupled_decoders():
    teacher, student = models()
    contexts = contexts_of(12)
    ar = window_tokens(teacher, contexts, 3, seed=5, batch_size=5)
    for i, context in enumerate(contexts):  # the uniforms of context i are u(seed, i, position)
        assert ar[i].tolist() == generate_ar(teacher, [context], 3, seed=5, sequence_ids=[i]).tokens[0].tolist()
    kf = window_tokens(student, contexts, 3, seed=5, batch_size=4)
    for i, context in enumerate(contexts):
        assert kf[i].tolist() == generate_kforcing(student, [context], 3, k=3, seed=5,
                                                   sequence_ids=[i]).tokens[0].tolist()
    result = coupled_agreement(teacher, student, contexts, 3, seed=5)
    assert result == agreement_from_tokens(ar, kf)
    assert result["exact_match"] < 1.0  # an untrained student does not match its teacher
    # A student as teacher decodes min(k, its max_k) per pass: a k=1 student's k=2 windows are two of its steps.
    one = PushForwardLM.from_teacher(student, 1).eval()
    two_steps = window_tokens(one, contexts, 2, seed=5, model_k=1)
    assert coupled_agreement(one, student, contexts, 2, seed=5) == agreement_from_tokens(
        two_steps, window_tokens(student, contexts, 2, seed=5))
    with pytest.raises(EvalError, match="k=5 is not allowed"):
        coupled_agreement(teacher, student, contexts, 5)


def test_perplexity_on_hand_built_models():
    teacher, _ = models()
    uniform = ARModel(CONFIG).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # every next-token distribution is uniform: perplexity = vocab size
    prompts, samples = [[1], [2, 3]], [[4, 5, 6], [7, 8, 9, 10]]
    assert perplexity(uniform, prompts, samples, batch_size=1) == pytest.approx(CONFIG.vocab_size, rel=PERPLEXITY_REL)
    # Against a direct computation: mean NLL over the 7 sample tokens.
    total = 0.0
    for prompt, sample in zip(prompts, samples):
        ids = torch.tensor([prompt + sample])
        logp = torch.log_softmax(teacher(ids[:, :-1])[0].double(), -1)
        total += -sum(logp[len(prompt) - 1 + j, s].item() for j, s in enumerate(sample))
    assert perplexity(teacher, prompts, samples) == pytest.approx(math.exp(total / 7), rel=PERPLEXITY_REL)
    with pytest.raises(EvalError, match="2 prompts for 1 samples"):
        perplexity(teacher, prompts, samples[:1])


def test_generate_samples_is_batch_independent():
    teacher, student = models()
    prompts = [[0]] * 5
    for model, kw in ((teacher, {}), (student, {"k": 2}), (student, {"k": 4, "freq_penalty": 1.0})):
        together = generate_samples(model, prompts, 9, seed=2, batch_size=5, **kw)
        apart = generate_samples(model, prompts, 9, seed=2, batch_size=2, **kw)
        assert together == apart and len(together) == 5 and all(len(s) == 9 for s in together)
        assert len({tuple(s) for s in together}) > 1  # one prompt, different noise per sample


def test_incompatible_models_are_refused():
    teacher, student = models()
    other = ARModel(ModelConfig.from_preset("tiny", vocab_size=301, max_seq_len=64))
    with pytest.raises(EvalError, match=r"vocabularies differ \(301 vs 300 tokens\)"):
        check_compatible(other, student)
    with pytest.raises(EvalError, match="vocabularies differ"):
        coupled_agreement(other, student, contexts_of(2), 1)
    texts = ["def f(x):\n    return x\n" * 20, "import os\nprint(os.getcwd())\n" * 20]
    a, b = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts[::-1] + ["zzz qqq"] * 5, vocab_size=300)
    if a.fingerprint() != b.fingerprint():
        with pytest.raises(EvalError, match="tokenizers differ"):
            check_compatible(teacher, student, a, b)
    check_compatible(teacher, student, a, a)


def test_decode_speed_rows():
    teacher, student = models()
    rows = decode_speed(teacher, student, [1, 2, 4], [1, 2], contexts_of(2, seed=1)[:1] * 2, 8, repeats=1)
    assert [(r["batch"], r["decoder"]) for r in rows] == [(b, d) for b in (1, 2) for d in ("AR", "k=1", "k=2", "k=4")]
    by = {(r["batch"], r["decoder"]): r for r in rows}
    assert by[(1, "AR")]["passes"] == 8 and by[(1, "k=4")]["passes"] == 2 and by[(1, "k=2")]["passes"] == 4
    assert by[(1, "AR")]["speedup"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["ms_per_pass"] > 0 for r in rows)
    assert default_ks(4) == [1, 2, 4] and default_ks(3) == [1, 2, 3] and default_ks(1) == [1]
