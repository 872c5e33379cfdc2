"""The vLLM drafter export and `kforcing serve`'s checks, without vLLM: the exported checkpoint computes the chain
head (a from-the-file re-implementation of its documented layout reproduces the head's features and draft logits),
bad students and folders get clear errors, and `kforcing serve` builds vLLM's command line. Serving itself runs in
vLLM's own environment (tests/test_vllm_serving.py)."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf_models import save_tiny  # noqa: E402
from tiny_models import draft_student, peaked_teacher  # noqa: E402

from kforcing.cli import main  # noqa: E402
from kforcing.models.transformer import KVCache  # noqa: E402
from kforcing.serving.vllm_export import export_vllm_head, vllm_head_config  # noqa: E402
from kforcing.serving.vllm_format import ARCHITECTURE, FORMAT_VERSION  # noqa: E402
from kforcing.serving.vllm_serve import ServeError, serve_command, speculative_config  # noqa: E402
from kforcing.students.draft.student import DraftStudent, HeadConfig  # noqa: E402
from kforcing.teachers.hf_teacher import load_hf_teacher  # noqa: E402
from kforcing.teachers.protocol import decode_layers  # noqa: E402


def _student(tmp_path, family="llama", draft_vocab=None, pathway="chain"):
    save_tiny(family, tmp_path / "teacher")
    teacher, _ = load_hf_teacher(f"hf:{tmp_path / 'teacher'}", with_tokenizer=False)
    config = HeadConfig(max_k=4, pathway=pathway, num_layers=1, draft_vocab=draft_vocab) if pathway == "chain" \
        else HeadConfig(max_k=4, pathway=pathway)
    student = DraftStudent.from_teacher(teacher, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.head.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn_like(p))
    return student.eval()


def _rotate(x, positions, theta):
    """Rotary embedding, half-split pairs (j, j + D/2), as the export's config says ("rope": "neox")."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(0, half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions.double()[:, None] * freqs
    cos, sin = angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _exported_head(directory, hidden, next_ids, embed):
    """The head from the exported files alone, as their layout documents it: rows fc([embedding | feature]) at
    positions 0..S-1, blocks x + attn(LN(x)), x + mlp(LN(x)), causal. Returns the features (S, H)."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    w = load_file(str(directory / "model.safetensors"))
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps = config["kforcing"]["norm_eps"]
    x = torch.cat([embed(next_ids), hidden], dim=-1) @ w["fc.weight"].T
    positions = torch.arange(x.shape[0])
    for i in range(config["num_hidden_layers"]):
        def norm(t, name):
            return F.layer_norm(t, t.shape[-1:], w[f"layers.{i}.{name}.weight"], None, eps)
        q, k, v = (norm(x, "norm1") @ w[f"layers.{i}.attn.qkv.weight"].T).split(
            [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q = _rotate(q.view(-1, heads, dim), positions, config["rope_theta"])
        k = _rotate(k.view(-1, kv_heads, dim), positions, config["rope_theta"]).repeat_interleave(heads // kv_heads, 1)
        v = v.view(-1, kv_heads, dim).repeat_interleave(heads // kv_heads, 1)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + attn.transpose(0, 1).reshape(x.shape[0], -1) @ w[f"layers.{i}.attn.o.weight"].T
        x = x + F.gelu(norm(x, "norm2") @ w[f"layers.{i}.mlp.fc.weight"].T) @ w[f"layers.{i}.mlp.proj.weight"].T
    return x, w.get("draft_ids")


@pytest.mark.parametrize("draft_vocab", [None, 48])
def test_the_exported_files_compute_the_chain_head(tmp_path, draft_vocab):
    student = _student(tmp_path, draft_vocab=draft_vocab)
    teacher = student.teacher
    out = export_vllm_head(student, tmp_path / "drafter")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["kforcing"]["format"] == FORMAT_VERSION
    assert config["kforcing"]["draft_vocab"] == draft_vocab and config["kforcing"]["max_k"] == 4
    ids = torch.randint(0, teacher.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = decode_layers(teacher, teacher.embed(ids), KVCache.for_model(teacher, 1, 32), ids.shape[1])
        head_cache = KVCache(1, 1, 32, teacher.config.n_kv_head, teacher.config.head_dim)
        want = student.head.decode(teacher, features[:, :-1], ids[:, 1:], head_cache, ids.shape[1] - 1)[0]
        got, draft_ids = _exported_head(out, features[0, :-1], ids[0, 1:], lambda t: teacher.embed(t[None])[0])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the readout: the teacher's LM head on the feature (its final norm is inside the feature), over the draft
        # vocabulary's rows when there is one
        logits = student.head.readout(teacher, want)
        lm_head = teacher.model.get_output_embeddings().weight
        rows = lm_head if draft_ids is None else lm_head[draft_ids]
        torch.testing.assert_close(got @ rows.T, logits, atol=1e-4, rtol=1e-4)
    assert (draft_ids is None) == (draft_vocab is None)


def test_students_vllm_cannot_serve_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="pathway is 'trunk'"):
        export_vllm_head(_student(tmp_path / "a", pathway="trunk"), tmp_path / "x")
    with pytest.raises(ValueError, match="'gpt2' model"):
        export_vllm_head(_student(tmp_path / "b", family="gpt2"), tmp_path / "x")
    kforcing_teacher = draft_student(peaked_teacher(), HeadConfig(max_k=4, pathway="chain", num_layers=1))
    with pytest.raises(ValueError, match="kforcing ARModel"):
        export_vllm_head(kforcing_teacher, tmp_path / "x")
    with pytest.raises(TypeError, match="needs a DraftStudent"):
        export_vllm_head(object(), tmp_path / "x")


def test_serve_builds_vllms_command_and_checks_its_folders(tmp_path, capsys):
    student = _student(tmp_path)
    out = export_vllm_head(student, tmp_path / "drafter")
    command = serve_command(f"hf:{tmp_path / 'teacher'}", out, extra=["--port", "8123"])
    assert command[:3] == ["vllm", "serve", str((tmp_path / "teacher").resolve())]
    assert command[-2:] == ["--port", "8123"]
    assert json.loads(command[4]) == {"method": "eagle", "model": str(out.resolve()), "num_speculative_tokens": 3}
    assert command[5:7] == ["--dtype", "float32"]  # the student's, not vLLM's "auto" (bfloat16 on a CPU)
    assert "float32" not in serve_command(tmp_path / "teacher", out, extra=["--dtype", "bfloat16"])
    assert speculative_config(out, 2)["num_speculative_tokens"] == 2
    with pytest.raises(ServeError, match="positive int"):
        speculative_config(out, 0)
    with pytest.raises(ServeError, match="export a student first"):
        serve_command(tmp_path / "teacher", tmp_path / "nowhere")
    with pytest.raises(ServeError, match="no Hugging Face model there"):
        serve_command(tmp_path / "nowhere", out)
    stale = tmp_path / "stale"
    stale.mkdir()
    config = vllm_head_config(student)
    config["kforcing"]["format"] = FORMAT_VERSION + 1
    (stale / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServeError, match="export it again"):
        serve_command(tmp_path / "teacher", stale)
    # the command line: --print-command shows what `kforcing serve` runs, arguments after -- passed on
    assert main(["serve", "--teacher", str(tmp_path / "teacher"), "--drafter", str(out), "--print-command",
                 "--", "--max-num-seqs", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("vllm serve ") and "--speculative-config" in printed and "--max-num-seqs 16" in printed


def test_serve_without_vllm_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    out = export_vllm_head(_student(tmp_path), tmp_path / "drafter")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--teacher", str(tmp_path / "teacher"), "--drafter", str(out)])
    assert exit_.value.code == 2
    assert "needs vLLM" in capsys.readouterr().err


def test_export_vllm_command_writes_the_drafter(tmp_path, capsys):
    from kforcing.students.draft.checkpoint import save_draft_student

    student = _student(tmp_path)
    save_draft_student(tmp_path / "student", student)
    assert main(["export-vllm", "--student", str(tmp_path / "student"), "--teacher", f"hf:{tmp_path / 'teacher'}",
                 "--out", str(tmp_path / "drafter")]) == 0
    assert (tmp_path / "drafter" / "model.safetensors").is_file()
    assert "kforcing serve --teacher" in capsys.readouterr().out
