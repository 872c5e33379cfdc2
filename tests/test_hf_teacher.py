"""Hugging Face teachers: kforcing's attention inside transformers models, token rows, decoding, checkpoints, errors."""

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kforcing_ops  # noqa: E402
import kforcing.checkpoints.checkpoint as ckpt  # noqa: E402
from kforcing.workflows.loading import load_model  # noqa: E402
from kforcing.checkpoints.checkpoint import CheckpointError  # noqa: E402
from kforcing.students.draft.checkpoint import save_draft_student  # noqa: E402
from kforcing.students.draft.decode import generate_with_drafts  # noqa: E402
from kforcing.decoding.generate import generate_ar  # noqa: E402
from kforcing.students.draft.targets import head_step  # noqa: E402
from kforcing.teachers.hf_teacher import (HFTeacher, HFTeacherError, TransformersMissing, load_hf_teacher,  # noqa: E402
                                  require_transformers)
from kforcing.students.draft.hf_adapters import HFTrunkAdapters  # noqa: E402
from kforcing.students.draft.student import DraftStudent, HeadConfig, Sampling  # noqa: E402
from kforcing.models.transformer import KVCache  # noqa: E402
from kforcing_ops.nn import DecodeLinear  # noqa: E402
from conftest import expect_kernel  # noqa: E402
from kforcing.noise import counter_uniform  # noqa: E402
from hf_models import FAMILIES, VOCAB, save_tiny, tiny_tokenizer  # noqa: E402
from tolerances import CACHED_VS_FULL, HF_EAGER_FP64, HF_FP32, HF_FP64  # noqa: E402

SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95)


def loaded(family, directory, dtype=torch.float64, seed=0):
    """(the HF oracle with sdpa attention, the same weights as a kforcing HFTeacher)."""
    oracle = save_tiny(family, directory, seed=seed, dtype=dtype)
    teacher, _ = load_hf_teacher(f"hf:{directory}", dtype=dtype)
    return oracle, teacher


def trunk_student(teacher, readout="onehot", max_k=4, rank=4):
    """A trunk-pathway student whose adapters are far from zero (so hint rows differ from the teacher's)."""
    torch.manual_seed(1)
    student = DraftStudent.from_teacher(teacher, HeadConfig(pathway="trunk", adapter_rank=rank, max_k=max_k,
                                                            readout=readout))
    with torch.no_grad():
        for param in student.head.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return student.eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf_sdpa_attention(family, dtype, tmp_path):
    oracle, teacher = loaded(family, tmp_path, dtype)
    ids = torch.randint(0, VOCAB, (3, 20))
    positions = torch.arange(20) + torch.tensor([[0], [5], [37]])  # per-row positions
    with torch.no_grad():
        expected = oracle(ids, position_ids=positions).logits
        got = teacher(ids, positions)
    torch.testing.assert_close(got, expected, **(HF_FP64 if dtype == torch.float64 else HF_FP32))
    assert teacher.model.config._attn_implementation == "kforcing" and teacher.config.n_layer == 2
    assert teacher.config.n_kv_head == (4 if family == "gpt2" else 2)


def test_llama_eager_attention_is_a_looser_oracle(tmp_path):
    """eager computes its softmax in float32 even for a float64 model: kforcing agrees to float32 rounding."""
    _, teacher = loaded("llama", tmp_path)
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                              dtype=torch.float64).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids), eager(ids).logits, **HF_EAGER_FP64)


def test_a_model_held_in_memory_becomes_a_teacher(tmp_path):
    oracle = save_tiny("qwen2", tmp_path, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = oracle(ids).logits
    teacher = HFTeacher(oracle)  # switches the model's attention to kforcing's
    assert oracle.config._attn_implementation == "kforcing" and teacher.source is None
    torch.testing.assert_close(teacher(ids), expected, **HF_FP64)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoding_over_the_static_kv_cache_equals_the_full_pass(family, tmp_path):
    _, teacher = loaded(family, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 12))
    full = teacher(ids)
    cache = KVCache.for_model(teacher, 2, 16)
    steps = [teacher.decode(ids[:, :5], cache, logits="all")]
    steps += [teacher.decode(ids[:, i:i + 1], cache, logits="all") for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **CACHED_VS_FULL)
    assert cache.seqlens.tolist() == [12, 12]


def test_decode_passes_run_decode_linear_and_are_row_invariant(tmp_path):
    """load_hf_teacher makes the model's nn.Linear layers DecodeLinear: one k-row pass equals k one-row passes."""
    _, teacher = loaded("llama", tmp_path, dtype=torch.float32)
    assert any(isinstance(m, DecodeLinear) for m in teacher.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in teacher.model.modules())
    ids, new = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 6))
    together = KVCache.for_model(teacher, 2, 32)
    teacher.decode(ids, together, logits=None)
    with expect_kernel("decode_linear"):
        all_rows = teacher.decode(new, together, logits="all")
    one_by_one = KVCache.for_model(teacher, 2, 32)
    teacher.decode(ids, one_by_one, logits=None)
    steps = torch.stack([teacher.decode(new[:, j:j + 1], one_by_one, logits="last") for j in range(6)], dim=1)
    assert torch.equal(all_rows, steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_rows_are_the_teachers_and_hint_rows_are_adapted(family, tmp_path):
    _, teacher = loaded(family, tmp_path)
    student = trunk_student(teacher, readout="categorical")
    ids = torch.randint(0, VOCAB, (2, 10))
    stream, logits = student.trunk(ids)
    assert torch.equal(logits, teacher(ids))
    y1 = torch.randint(0, VOCAB, (2, 10))
    u = torch.rand(2, 10, 4, dtype=torch.float64)
    adapted = student.draft_logits(ids, stream, y1, u, 1.0)  # rows: y1 (a token row), then 2 hints
    with torch.no_grad():
        for layer in student.head.layers:
            for adapter in layer.values():
                adapter.lora_B.zero_()
        student.head.norm.load_state_dict(teacher.final_norm().state_dict())
    plain = student.draft_logits(ids, stream, y1, u, 1.0)
    assert torch.equal(adapted[:, :, 0], plain[:, :, 0])  # the token row ignores the adapters, bit for bit
    assert not torch.allclose(adapted[:, :, 1:], plain[:, :, 1:])  # the hint rows do not
    # With zero adapters every row is the teacher's own staircase pass over [context | y1 | hints].
    torch.testing.assert_close(plain[:, :, 0], student.teacher_window_logits(ids, y1[..., None])[:, :, 0], **HF_FP64)


@pytest.mark.parametrize("family", FAMILIES)
def test_verified_decoding_equals_sampling_from_the_hf_teacher(family, tmp_path):
    oracle, teacher = loaded(family, tmp_path)
    # categorical: the draft of token 2 comes from the teacher's own row, so drafts are accepted (fewer passes)
    student = trunk_student(teacher, readout="categorical")
    prompts = [[3, 14, 15, 92], [6], [53, 58, 97, 93, 23, 84, 62]]
    out = generate_with_drafts(student, prompts, 14, k=3, seed=5, verify=True, **SAMPLING)
    ar = generate_ar(teacher, prompts, 14, seed=5, **SAMPLING)
    assert torch.equal(out.tokens, ar.tokens) and out.num_passes < 14
    with pytest.raises(ValueError, match="compile is for draft students of kforcing's own"):
        generate_with_drafts(student, prompts, 14, k=3, seed=5, compile=True, **SAMPLING)
    # The same uniforms through transformers' own forward pass, one token at a time, with no cache.
    for b, prompt in enumerate(prompts):
        sequence = list(prompt)
        for _ in range(14):
            with torch.no_grad():
                logits = oracle(torch.tensor([sequence])).logits[:, -1].float()
            u = counter_uniform(5, torch.tensor([b]), torch.tensor([len(sequence)]))
            sequence.append(int(kforcing_ops.inverse_cdf_sample(logits, u, SAMPLING["temperature"],
                                                                SAMPLING["top_k"], SAMPLING["top_p"])[0]))
        assert sequence[len(prompt):] == ar.tokens[b].tolist()


def test_training_moves_only_the_adapters(tmp_path):
    _, teacher = loaded("gpt2", tmp_path, torch.float32)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    torch.manual_seed(0)
    student = DraftStudent.from_teacher(teacher, HeadConfig(pathway="trunk", readout="onehot", adapter_rank=2,
                                                            max_k=3))
    student.head.train()
    optimizer = torch.optim.Adam(student.head.parameters(), lr=1e-2)
    ids, u = torch.randint(0, VOCAB, (2, 12)), torch.rand(2, 12, 3, dtype=torch.float64)
    losses = []
    for _ in range(5):
        loss, _ = head_step(student, ids, u, Sampling())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(value, before[name]) for name, value in teacher.state_dict().items())
    assert not any(module._forward_hooks for module in teacher.modules())  # the adapters' hooks are gone


def test_a_checkpoint_stores_the_adapters_and_the_fingerprint_never_the_teacher(tmp_path):
    _, teacher = loaded("llama", tmp_path / "teacher", torch.float32)
    student = trunk_student(teacher)
    save_draft_student(tmp_path / "student", student,
                       provenance=ckpt.Provenance("distill", 0, teacher=f"hf:{tmp_path / 'teacher'}", k=4))
    config = ckpt.read_config(tmp_path / "student")
    assert config["teacher_kind"] == "hf" and config["teacher_fingerprint"] == student.fingerprint
    saved = ckpt.load_tensors(tmp_path / "student", "model.safetensors")
    assert set(saved) == set(student.head.state_dict()) and not any(key.startswith("model.") for key in saved)
    loaded_student, _, _ = load_model(tmp_path / "student")  # the teacher found through the provenance
    assert loaded_student.fingerprint == student.fingerprint
    for name, value in student.head.state_dict().items():
        assert torch.equal(loaded_student.head.state_dict()[name], value)
    prompts = [[1, 2, 3], [4]]
    assert torch.equal(generate_with_drafts(loaded_student, prompts, 8, seed=2).tokens,
                       generate_with_drafts(student, prompts, 8, seed=2).tokens)
    save_tiny("llama", tmp_path / "other", seed=7)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_model(tmp_path / "student", teacher=f"hf:{tmp_path / 'other'}")
    with pytest.raises(ValueError, match="merged export embeds kforcing teachers only"):
        save_draft_student(tmp_path / "merged", student, merged=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_chain_student_of_an_hf_teacher_trains_verifies_and_round_trips(family, tmp_path):
    """The chain pathway on a Hugging Face teacher: fresh kforcing blocks of its shape, trained a few steps on its
    own features (only the head moves), verified decoding equal to AR sampling, and a checkpoint (with a draft
    vocabulary) that loads the same head back through the teacher's hf: path."""
    from kforcing.students.draft.chain_head import ChainHead
    from kforcing.students.draft.targets import chain_step

    _, teacher = loaded(family, tmp_path / "teacher", torch.float32)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    torch.manual_seed(0)
    student = DraftStudent.from_teacher(teacher, HeadConfig(pathway="chain", num_layers=1, draft_vocab=48))
    assert isinstance(student.head, ChainHead)
    student.head.set_draft_vocab(torch.arange(VOCAB, dtype=torch.float64))  # the 48 largest ids
    ids = torch.randint(0, VOCAB, (4, 16))
    u = torch.rand(4, 16, 4, dtype=torch.float64)
    optimizer = torch.optim.Adam(student.head.parameters(), lr=1e-2)
    student.head.train()
    losses = []
    for _ in range(6):
        loss, _ = chain_step(student, ids, u, Sampling(**SAMPLING))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(value, before[name]) for name, value in teacher.state_dict().items())
    student.eval()
    prompts = [[3, 14, 15, 92], [6], [53, 58, 97, 93, 23, 84, 62]]
    ar = generate_ar(teacher, prompts, 14, seed=5, **SAMPLING)
    for k in (4, None):
        assert torch.equal(generate_with_drafts(student, prompts, 14, k=k, seed=5, **SAMPLING).tokens, ar.tokens)
    save_draft_student(tmp_path / "student", student,
                       provenance=ckpt.Provenance("distill", 0, teacher=f"hf:{tmp_path / 'teacher'}", k=4))
    assert ckpt.read_config(tmp_path / "student")["teacher_kind"] == "hf"
    again, _, _ = load_model(tmp_path / "student")
    for name, value in student.head.state_dict().items():
        assert torch.equal(again.head.state_dict()[name], value)
    assert torch.equal(generate_with_drafts(again, prompts, 14, k=4, seed=5, **SAMPLING).tokens, ar.tokens)


def test_unsupported_architectures_and_settings_are_clear_errors(tmp_path):
    transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128).save_pretrained(tmp_path / "neox")
    with pytest.raises(HFTeacherError, match=r"'gpt_neox' is not supported.*\['gpt2', 'llama', 'mistral', 'qwen2'\]"):
        load_hf_teacher(f"hf:{tmp_path / 'neox'}")
    with pytest.raises(HFTeacherError, match="no such directory"):
        load_hf_teacher(f"hf:{tmp_path / 'missing'}")
    _, teacher = loaded("gpt2", tmp_path / "gpt2", torch.float32)
    with pytest.raises(ValueError, match="a Hugging Face teacher takes pathway 'trunk' or 'chain'"):
        DraftStudent.from_teacher(teacher, HeadConfig(pathway="head"))
    with pytest.raises(ValueError, match="pathway 'onepass' needs a kforcing ARModel teacher"):
        DraftStudent.from_teacher(teacher, HeadConfig(pathway="onepass"))
    with pytest.raises(ValueError, match="LoRA adapters only"):
        DraftStudent.from_teacher(teacher, HeadConfig(pathway="trunk", adapter_rank=0))
    default = DraftStudent.from_teacher(teacher, HeadConfig(pathway="trunk"))  # a LoRA: never a copy of the model
    assert default.head_config.adapter_rank == HFTrunkAdapters.DEFAULT_RANK == 8
    with pytest.raises(ValueError, match="compile and cuda_graph are for kforcing's own ARModel"):
        generate_ar(teacher, [[1]], 2, compile=True)
    with pytest.raises(RuntimeError, match="must be run through kforcing"):
        teacher.model(torch.tensor([[1, 2]]))  # the "kforcing" attention outside kforcing has no callback


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path):
    save_tiny("llama", tmp_path, tokenizer=tiny_tokenizer(320))  # the model has 300 embedding rows
    with pytest.raises(HFTeacherError, match="320 tokens but the model's embedding only 300"):
        load_hf_teacher(f"hf:{tmp_path}")


def test_an_unreachable_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as without a network, but at once
    with pytest.raises(HFTeacherError, match="not a local directory and the hub did not provide it"):
        load_hf_teacher("hf:kforcing-tests/no-such-model")


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TransformersMissing, match=r'pip install --no-build-isolation -e "\.\[hf\]"'):
        require_transformers()


def test_loading_draws_no_progress_bar_and_restores_the_setting(tmp_path, capfd):
    save_tiny("llama", tmp_path)
    capfd.readouterr()
    logging = transformers.utils.logging
    logging.enable_progress_bar()
    load_hf_teacher(f"hf:{tmp_path}")
    assert "Loading weights" not in capfd.readouterr().err  # kforcing's commands draw their own progress
    assert logging.is_progress_bar_enabled()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_chain_step_runs_under_bf16_autocast(family, tmp_path):
    """distill --dtype bfloat16 autocasts the training step: in the teacher's staircase pass a rotary model's q and
    k come out in float32 beside a bf16 v, and kforcing's attention takes them in the autocast dtype, as torch's
    SDPA does (it raised "`q`, `k` and `v` must have one dtype")."""
    from kforcing.students.draft.targets import chain_step

    _, teacher = loaded(family, tmp_path, torch.float32)
    student = DraftStudent.from_teacher(teacher, HeadConfig(pathway="chain", num_layers=1))
    ids = torch.randint(0, VOCAB, (2, 12))
    u = torch.rand(2, 12, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for rollout in (False, True):  # training, and validation's rollout on the head's own drafts
            loss, _ = chain_step(student, ids, u, Sampling(**SAMPLING), rollout=rollout)
            assert torch.isfinite(loss)
