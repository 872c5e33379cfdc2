"""kforcing.workflows.distill: targets equal the teachers' own decoding, the student learns, resuming is exact, DDP,
errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kforcing.checkpoints.checkpoint as ckpt
from kforcing.workflows.loading import load_model
import kforcing_ops
from kforcing.cli.commands import main
from kforcing.data import heldout_contexts
from kforcing.students.push_forward.evaluate import coupled_agreement
from kforcing.training.schedule import check_schedule
from kforcing.training.stage_task import DistillError, plateaued
from kforcing.workflows.distill import DistillConfig, distill, parse_tau
from kforcing.options import parse_int_list
from kforcing.students.push_forward.targets import ar_targets, noise_inversion_batch, self_forcing_targets, window_loss
from kforcing.training.batch_noise import batch_noise
from kforcing.training.trainer import EMA, RAW_WEIGHTS_FILE, TrainingError
from kforcing.decoding.generate import generate_ar, generate_kforcing
from kforcing.models.transformer import ARModel, ModelConfig
from kforcing.students.push_forward.model import PushForwardLM
from kforcing.noise import counter_uniform
from tolerances import DDP_LOSS_ABS, DDP_WEIGHTS, HAND_BUILT_LOSS_ABS, RECOMPUTED_AGREEMENT_ABS
import tiny_models

pytestmark = pytest.mark.filterwarnings("ignore:kforcing_ops.*reference:RuntimeWarning")

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig.from_preset("tiny", vocab_size=97, max_seq_len=64)


def random_models(max_k=2, seed=0):
    """An AR teacher with sharp distributions and a student from it whose noise encoder matters (untrained)."""
    torch.manual_seed(seed)
    teacher = ARModel(TINY).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)
    student = PushForwardLM.from_teacher(teacher, max_k).eval()
    with torch.no_grad():
        student.noise.weight.normal_(std=1.0)
        for p in student.noise.mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def diverse_student(max_k, seed=0):
    torch.manual_seed(seed)
    return tiny_models.diverse_student(TINY, max_k)


# ---------------------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_self_forcing_targets_equal_two_decode_steps_of_the_teacher(k, tau):
    """Stage k -> 2k: for every window, the targets are exactly the tokens the stage-k teacher emits in two
    generate_kforcing steps (k tokens each) from that context with the same uniforms."""
    teacher = diverse_student(max_k=k)
    batch, n, seed = 2, 14, 5
    ids = torch.randint(0, TINY.vocab_size, (batch, n))
    # Window t's 2k uniforms are those generate_kforcing draws for positions t+1..t+2k of sequence b.
    positions = torch.arange(n)[:, None] + 1 + torch.arange(2 * k)
    u = counter_uniform(seed, torch.arange(batch)[:, None, None], positions[None])
    targets = self_forcing_targets(teacher, ids, u, tau)
    assert targets.shape == (batch, n, 2 * k) and targets.dtype == torch.int64
    for b in range(batch):
        for t in range(n):
            out = generate_kforcing(teacher, [ids[b, :t + 1].tolist()], 2 * k, k=k, seed=seed, temperature=tau,
                                    sequence_ids=[b])
            assert out.num_passes == 2
            assert out.tokens[0].tolist() == targets[b, t].tolist(), (b, t)
    # The second half depends on the first half's tokens (it is not the first step with other uniforms), and the
    # tokens depend on the noise.
    hints_only = teacher.forward_train(ids, u[..., k:], tau).argmax(-1)
    assert (hints_only != targets[..., k:]).float().mean() > 0.2
    other = self_forcing_targets(teacher, ids, 1 - u, tau)
    assert (other != targets).float().mean() > 0.2
    assert len(set(targets.flatten().tolist())) > 10


def test_self_forcing_targets_with_per_sequence_temperatures():
    teacher = diverse_student(max_k=2)
    ids = torch.randint(0, TINY.vocab_size, (3, 10))
    u = torch.rand(3, 10, 4, dtype=torch.float64)
    tau = torch.tensor([0.6, 1.0, 1.4])
    targets = self_forcing_targets(teacher, ids, u, tau)
    for b in range(3):
        alone = self_forcing_targets(teacher, ids[b:b + 1], u[b:b + 1], float(tau[b]))
        assert torch.equal(alone[0], targets[b])
    with pytest.raises(ValueError, match="max_k >= 4"):
        self_forcing_targets(teacher, ids, torch.rand(3, 10, 8, dtype=torch.float64), 1.0)
    with pytest.raises(TypeError, match="PushForwardLM teacher"):
        self_forcing_targets(random_models()[0], ids, u, 1.0)


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_ar_targets_are_the_teachers_inverse_cdf_tokens(tau):
    """Stage 1: the target of window t is the token generate_ar samples at t+1 with the same uniform (float64 CDF
    at temperature tau)."""
    teacher, _ = random_models()
    batch, n, seed = 2, 16, 3
    ids = torch.randint(0, TINY.vocab_size, (batch, n))
    u = counter_uniform(seed, torch.arange(batch)[:, None, None], torch.arange(n)[None, :, None] + 1)
    targets = ar_targets(teacher, ids, u, torch.full((batch,), tau))
    for b in range(batch):
        for t in range(n):
            out = generate_ar(teacher, [ids[b, :t + 1].tolist()], 1, seed=seed, temperature=tau, sequence_ids=[b])
            assert out.tokens[0, 0].item() == targets[b, t, 0].item(), (b, t)
    # Targets follow tau: as tau -> 0 they become the argmax.
    cold = ar_targets(teacher, ids, u, 1e-4)
    assert torch.equal(cold[..., 0], teacher(ids).argmax(-1))


def test_noise_inversion_places_u_inside_the_data_tokens_interval():
    teacher, _ = random_models()
    with torch.no_grad():
        teacher.lm_head.weight.div_(20)  # smooth distributions: every token has a float64-resolvable interval
    tokens = torch.randint(0, TINY.vocab_size, (2, 12 + 3))
    v = torch.rand(2, 12, 3, dtype=torch.float64)
    for tau in (1.0, 0.5):
        ids, u, targets, valid = noise_inversion_batch(teacher, tokens, v, tau)
        assert torch.equal(ids, tokens[:, :12])
        for j in range(3):
            assert torch.equal(targets[:, :, j], tokens[:, 1 + j:13 + j])
        assert bool(valid.all())
        # The exact inverse-CDF rule maps every u back to its data token, at this tau.
        logits = teacher(tokens[:, :-1]).double()
        for j in range(3):
            back = kforcing_ops.reference.inverse_cdf_sample(logits[:, j:12 + j].reshape(-1, TINY.vocab_size),
                                                             u[:, :, j].reshape(-1).contiguous(), tau)
            assert back.tolist() == targets[:, :, j].reshape(-1).tolist()


def test_noise_inversion_reports_unreachable_tokens():
    """Fragility: after a token holding all but e^-92 of the mass, the CDF is 1.0 in float64, so the intervals of the
    later tokens are empty and no uniform maps back to them."""
    bias = torch.zeros(TINY.vocab_size)
    bias[0] = 92.0

    class Peaked(ARModel):
        def forward(self, ids, positions=None):
            return super().forward(ids, positions) + bias

    teacher = Peaked(TINY).eval()
    with torch.no_grad():
        teacher.lm_head.weight.zero_()
    tokens = torch.tensor([[3, 50, 3, 50]])
    _, u, targets, valid = noise_inversion_batch(teacher, tokens, torch.full((1, 3, 1), 0.5, dtype=torch.float64),
                                                 1.0)
    assert targets[0, :, 0].tolist() == [50, 3, 50]
    assert not bool(valid.any())
    _, _, _, valid = noise_inversion_batch(teacher, torch.tensor([[3, 0, 0, 0]]),
                                           torch.full((1, 3, 1), 0.5, dtype=torch.float64), 1.0)
    assert bool(valid.all())  # the likely token is always reachable


def test_batch_noise_is_a_pure_function_of_its_keys():
    keys = torch.arange(10, 14)
    u, tau = batch_noise(7, 1, keys, 5, 4, (0.5, 1.5))
    assert u.shape == (4, 5, 4) and u.dtype == torch.float64 and tau.shape == (4,)
    u2, tau2 = batch_noise(7, 1, keys[2:], 5, 4, (0.5, 1.5))
    assert torch.equal(u[2:], u2) and torch.equal(tau[2:], tau2)  # independent of the batch composition
    assert not torch.equal(batch_noise(7, 2, keys, 5, 4, (0.5, 1.5))[0], u)  # another stage, other noise
    assert bool(((tau >= 0.5) & (tau <= 1.5)).all()) and len(set(tau.tolist())) == 4
    assert batch_noise(7, 1, keys, 5, 4, (1.0, 1.0))[1].tolist() == [1.0] * 4


def test_window_loss_and_ema():
    logits = torch.full((1, 2, 2, 5), -10.0)
    targets = torch.tensor([[[1, 2], [3, 4]]])
    logits[0, 0, 0, 1] = logits[0, 0, 1, 2] = logits[0, 1, 0, 3] = 10.0  # window 1 wrong at offset 2
    logits[0, 1, 1, 0] = 10.0
    loss, offset_loss, offset_acc, exact = window_loss(logits, targets)
    assert offset_acc.tolist() == [1.0, 0.5] and exact.item() == 0.5
    assert offset_loss[0].item() < 1e-6 and offset_loss[1].item() == pytest.approx(10.0, abs=HAND_BUILT_LOSS_ABS)
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.5, 2/11)
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(1 - 2 / 11)
    target = torch.nn.Linear(2, 2, bias=False)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])


def test_plateau_rule():
    config = DistillConfig(teacher="t", out_dir="o", pathway="full", plateau_patience=2, plateau_delta=0.01,
                           min_steps=100)
    assert not plateaued([0.1, 0.2, 0.3], config, 200)
    assert plateaued([0.1, 0.3, 0.305, 0.309], config, 200)
    assert not plateaued([0.1, 0.3, 0.305, 0.309], config, 50)  # before min_steps
    assert not plateaued([0.1, 0.3, 0.305, 0.32], config, 200)
    config.plateau_patience = None
    assert not plateaued([0.3] * 10, config, 1000)


# ---------------------------------------------------------------------------------------------------------
# Settings


def test_schedule_and_settings_errors():
    check_schedule([1, 2, 4])
    check_schedule([1, 2, 4, 8])
    check_schedule([4, 8], start=4)
    for schedule, message in [([1, 3], "does not double"), ([1, 2, 2], "does not double"),
                              ([2, 4], "must start at k=1"), ([], "non-empty"), ([1, 0], "positive ints")]:
        with pytest.raises(DistillError, match=message):
            check_schedule(schedule)
    check_schedule([1, 3, 4], "noise-inversion")
    with pytest.raises(DistillError, match="must increase"):
        check_schedule([2, 1], "noise-inversion")
    assert parse_int_list("1,2, 4", "--schedule") == [1, 2, 4]
    with pytest.raises(ValueError, match="--schedule must be comma-separated integers"):
        parse_int_list("1,two", "--schedule")
    assert parse_tau("0.9") == (0.9, 0.9) and parse_tau("0.7:1.2") == (0.7, 1.2)
    with pytest.raises(DistillError, match="--tau"):
        parse_tau("hot")
    with pytest.raises(DistillError, match="steps has 2 values for 3 stages"):
        DistillConfig(teacher="t", out_dir="o", pathway="full", steps=[5, 5]).validate()
    with pytest.raises(DistillError, match="tau range"):
        DistillConfig(teacher="t", out_dir="o", pathway="full", tau=(1.2, 0.7)).validate()
    with pytest.raises(DistillError, match="unknown objective"):
        DistillConfig(teacher="t", out_dir="o", pathway="full", objective="magic").validate()
    with pytest.raises(DistillError, match=r"stop_after must be in \[1, 30\]"):
        DistillConfig(teacher="t", out_dir="o", pathway="full", steps=[10], stop_after=31).validate()


# ---------------------------------------------------------------------------------------------------------
# Runs on a tiny trained teacher


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return tiny_models.trained_teacher(tmp_path_factory.mktemp("distill"))


def short(teacher_run, out, **overrides):
    settings = dict(teacher=str(teacher_run), out_dir=str(out), pathway="full", schedule=[1, 2], steps=[4],
                    batch_size=4, seq_len=16, warmup_steps=2, eval_interval=2, eval_batches=1, ar_eval_contexts=8,
                    save_interval=100, log_interval=1, progress=False, device="cpu")
    settings.update(overrides)
    return DistillConfig(**settings)


def test_stage1_raises_agreement_and_stage2_keeps_improving(teacher_run, tmp_path):
    """A few hundred CPU steps: the AR agreement of stage 1 rises far above the untrained student's; stage 2 starts
    exactly where stage 1 ended (offset 1 reproduces its teacher) and improves on its own targets."""
    out = tmp_path / "student"
    config = short(teacher_run, out, steps=[300, 100], batch_size=16, seq_len=32, warmup_steps=20,
                   eval_interval=100, eval_batches=4, ar_eval_contexts=128, log_interval=50)
    summary = distill(config)
    one, two = summary["stages"]
    assert (one["k"], one["step"], two["k"], two["step"]) == (1, 300, 2, 100)
    before, after = one["initial"]["ar_agree_1"], one["ar_agree_1"]
    assert before < 0.1, before  # the untrained noise encoder: close to chance
    assert after > 0.25 and after > 5 * before, (before, after)  # measured: 0.04 -> 0.34
    assert one["val_exact_match"] > 0.25  # held-out windows agree with the teacher's float64 inverse CDF
    # Stage 2 starts from the stage-1 student: at offset 1 it reproduces its teacher exactly.
    assert two["initial"]["val_acc_1"] == 1.0
    assert two["val_exact_match"] > two["initial"]["val_exact_match"] + 0.1
    assert two["val_acc_2"] > two["initial"]["val_acc_2"] + 0.1
    assert two["ar_agree_2"] > two["initial"]["ar_agree_2"]
    # The exported students: k=2 is the run's latest; agreement recomputed from the checkpoint matches the log.
    student, _, config_json = load_model(out)
    assert isinstance(student, PushForwardLM) and student.max_k == 2
    assert ckpt.resolve_checkpoint(out) == out / "stage_k2" / "final"
    assert config_json["provenance"]["k"] == 2
    teacher, _, _ = load_model(teacher_run)
    stage1, _, _ = load_model(out / "stage_k1" / "final")
    from kforcing.data import TokenDataset
    contexts = heldout_contexts(TokenDataset(teacher_run / "data"), 128, max_len=32, seed=0)
    again = coupled_agreement(teacher, stage1, contexts, 1, seed=0)
    assert again["per_offset"][0] == pytest.approx(after, abs=RECOMPUTED_AGREEMENT_ABS)
    records = [json.loads(line) for line in (out / "stage_k2" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert {"train_loss_1", "train_loss_2", "train_acc_1", "train_acc_2", "train_exact_match", "lr",
            "grad_norm", "windows_per_s"} <= set(train[-1])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 100]


def run_records(out, k):
    lines = (out / f"stage_k{k}" / "metrics.jsonl").read_text().splitlines()
    return [{key: v for key, v in json.loads(line).items() if key != "windows_per_s"} for line in lines]


def test_resume_mid_stage_is_exact(teacher_run, tmp_path, capsys):
    straight = distill(short(teacher_run, tmp_path / "straight", steps=[4, 6]))
    first = distill(short(teacher_run, tmp_path / "split", steps=[4, 6], stop_after=7))
    assert [s["k"] for s in first["stages"]] == [1] and first["checkpoint"] is None
    assert ckpt.resolve_checkpoint(tmp_path / "split" / "stage_k2").name == "step_0000003"
    with pytest.raises(DistillError, match="already holds a distillation run; pass --resume"):
        distill(short(teacher_run, tmp_path / "split", steps=[4, 6]))
    resumed = distill(short(teacher_run, tmp_path / "split", steps=[4, 6], resume=True))
    assert "changed settings" not in capsys.readouterr().err
    assert [s["step"] for s in resumed["stages"]] == [s["step"] for s in straight["stages"]] == [4, 6]
    for path in ("stage_k1/final/model.safetensors", "stage_k2/final/model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / path)), load_file(str(tmp_path / "split" / path))
        for name in a:
            assert torch.equal(a[name], b[name]), (path, name)  # bit for bit
    a = load_file(str(ckpt.resolve_checkpoint(tmp_path / "straight" / "stage_k2") / RAW_WEIGHTS_FILE))
    b = load_file(str(ckpt.resolve_checkpoint(tmp_path / "split" / "stage_k2") / RAW_WEIGHTS_FILE))
    assert all(torch.equal(a[name], b[name]) for name in a)
    for k in (1, 2):
        assert run_records(tmp_path / "split", k) == run_records(tmp_path / "straight", k)
    assert resumed["stages"][1]["initial"] == straight["stages"][1]["initial"]
    # Re-running a finished run keeps every stage.
    again = distill(short(teacher_run, tmp_path / "split", steps=[4, 6], resume=True))
    assert [s["step"] for s in again["stages"]] == [4, 6]
    # A stage marked finished whose exported student is gone is an error, not a silent retrain.
    import shutil
    shutil.rmtree(tmp_path / "split" / "stage_k1" / "final")
    with pytest.raises(ckpt.CheckpointError, match="marks stage k=1 finished but .* is not a checkpoint"):
        distill(short(teacher_run, tmp_path / "split", steps=[4, 6], resume=True))


def test_plateau_rule_ends_a_stage_early(teacher_run, tmp_path):
    """With an unreachable required gain, a stage stops at its second evaluation and the next stage starts."""
    summary = distill(short(teacher_run, tmp_path / "p", steps=[10], plateau_patience=1, plateau_delta=1.0))
    one, two = summary["stages"]
    assert one["plateaued"] and one["step"] == 4 and two["plateaued"] and two["step"] == 4
    assert summary["checkpoint"] is not None and ckpt.resolve_checkpoint(tmp_path / "p").parent.name == "stage_k2"
    assert [r["step"] for r in run_records(tmp_path / "p", 1) if "val_loss" in r] == [0, 2, 4]


def test_noise_inversion_objective_and_bf16(teacher_run, tmp_path):
    summary = distill(short(teacher_run, tmp_path / "ni", objective="noise-inversion", schedule=[1, 3], steps=[3]))
    assert [s["k"] for s in summary["stages"]] == [1, 3]
    records = [json.loads(line) for line in (tmp_path / "ni" / "stage_k3" / "metrics.jsonl").read_text().splitlines()]
    valid = [r["inversion_valid"] for r in records if "inversion_valid" in r]
    assert valid and all(0.9 <= v <= 1.0 for v in valid)
    assert any("train_acc_3" in r for r in records) and any("val_acc_3" in r for r in records)
    summary = distill(short(teacher_run, tmp_path / "bf16", schedule=[1], steps=[3], dtype="bfloat16"))
    weights = load_file(str(tmp_path / "bf16" / "stage_k1" / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert summary["stages"][0]["train_loss"] < 20


def test_distill_cli_and_its_errors(teacher_run, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["distill", "--teacher", str(teacher_run), "--pathway", "full", "--out", str(out), "--schedule", "1,2",
            "--steps", "2,3", "--batch-size", "2", "--seq-len", "8", "--eval-interval", "2", "--eval-batches", "1",
            "--ar-eval-contexts", "4", "--tau", "0.8:1.2", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "stage k=1: 2 steps" in err and "stage k=2: 3 steps" in err and "student: " in err
    assert json.loads((out / "distill.json").read_text())["tau"] == [0.8, 1.2]
    assert main(["sample", "--ckpt", str(out), "--k", "2", "--max-new-tokens", "6", "--no-stop"]) == 0
    assert "K-Forcing k=2: 6 tokens in 3 passes" in capsys.readouterr().err

    def fails(extra, message, base=None):
        with pytest.raises(SystemExit) as error:
            main((base or args[:5] + ["--out", str(tmp_path / "bad")]) + extra)
        assert error.value.code == 2
        text = capsys.readouterr().err
        assert text.startswith("kforcing: error: ") and message in text, text

    fails(["--schedule", "1,3"], "does not double: after k=1 comes k=3")
    fails(["--schedule", "2,4"], "must start at k=1 for an AR teacher")
    fails(["--steps", "5,5", "--schedule", "1,2,4"], "steps has 2 values for 3 stages")
    fails([], "already holds a distillation run; pass --resume", base=args)
    fails(["--seq-len", "300"], "exceeds the teacher's max_seq_len=256")
    with pytest.raises(SystemExit) as error:
        main(["distill", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert error.value.code == 2 and "no checkpoint at" in capsys.readouterr().err
    # A teacher without a tokenizer cannot tokenise contexts.
    teacher, _, _ = load_model(teacher_run)
    ckpt.save_checkpoint(tmp_path / "bare", teacher)
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", str(tmp_path / "bare"), "--out", str(tmp_path / "y"), "--device", "cpu"])
    assert "has no tokenizer.json" in capsys.readouterr().err
    # A student as teacher continues the schedule at 2 * max_k.
    fails(["--teacher", str(out / "stage_k1" / "final"), "--schedule", "1,2"], "must start at k=2")


def test_continuing_from_a_student_teacher(teacher_run, tmp_path):
    first = distill(short(teacher_run, tmp_path / "a", schedule=[1], steps=[2]))
    summary = distill(short(teacher_run, tmp_path / "b", teacher=first["checkpoint"], schedule=[2], steps=[2]))
    assert summary["stages"][0]["teacher_max_k"] == 1 and summary["stages"][0]["initial"]["val_acc_1"] == 1.0
    assert "ar_agree_1" not in summary["stages"][0]  # no AR teacher at hand: only the stage metrics


def test_ddp_two_cpu_processes_match_one_process_with_accumulation(teacher_run, tmp_path):
    """torchrun, 2 processes on gloo with batch b each == 1 process with batch b and grad_accum 2."""
    args = ["distill", "--pathway", "full", "--teacher", str(teacher_run), "--schedule", "1,2", "--steps", "2",
            "--batch-size", "2",
            "--seq-len", "8", "--eval-interval", "2", "--eval-batches", "2", "--ar-eval-contexts", "4",
            "--warmup", "1", "--log-interval", "1", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kforcing.cli", *args, "--out", str(tmp_path / "ddp")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    distill(short(teacher_run, tmp_path / "single", steps=[2], batch_size=2, seq_len=8, grad_accum=2,
                  eval_batches=2, ar_eval_contexts=4, warmup_steps=1))
    for k in (1, 2):
        a = load_file(str(tmp_path / "ddp" / f"stage_k{k}" / "final" / "model.safetensors"))
        b = load_file(str(tmp_path / "single" / f"stage_k{k}" / "final" / "model.safetensors"))
        for name in a:
            torch.testing.assert_close(a[name], b[name], **DDP_WEIGHTS, msg=name)
        ddp_records = run_records(tmp_path / "ddp", k)
        one_records = run_records(tmp_path / "single", k)
        assert len(ddp_records) == len(one_records)
        for x, y in zip(ddp_records, one_records):
            for key in ("train_loss", "val_loss", "val_exact_match"):
                if key in x:
                    assert x[key] == pytest.approx(y[key], abs=DDP_LOSS_ABS), key


def test_a_non_finite_loss_stops_a_stage_before_anything_is_saved(teacher_run, tmp_path, monkeypatch):
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    with pytest.raises(TrainingError, match="distill k=1 .*: non-finite loss at step 1"):
        distill(short(teacher_run, tmp_path / "nan", save_interval=1))
    assert not list((tmp_path / "nan").glob("**/checkpoints/step_*"))
    assert not (tmp_path / "nan" / "latest.json").exists()
