"""End-to-end trainer behaviour on the CPU: one step, loss terms, export, NaN handling, exact resume."""

import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, make_demo_data, read_metrics, run_train, tiny_overrides

from dinov2.errors import CheckpointError, ConfigError, TrainingError
from dinov2.models.model_file import load_model_file
from dinov2.train import train as train_module
from dinov2.train.checkpointing import list_checkpoints, read_checkpoint_file
from dinov2.utils.precision import Precision, choose_precision


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo_data"))


def test_a_step_changes_student_and_every_term_is_finite(manifest, tmp_path):
    # step 0 has lr 0 (warm-up starts at 0), so two steps
    assert train_module.main(["--output-dir", str(tmp_path), *tiny_overrides(manifest, **{"train.max_iters": 2})]) == 0
    record = read_metrics(tmp_path)[-1]
    for term in ("loss", "dino_global", "dino_local", "ibot", "koleo", "supervised"):
        assert math.isfinite(record[term]) and record[term] != 0, term
    assert 0 < record["mfu"] < 1  # against the matmul rate the log states
    log = (tmp_path / "log.txt").read_text()
    assert "MFU is measured against" in log and "GFLOP/s fp32 on cpu" in log and "% of " in log
    state = read_checkpoint_file(list_checkpoints(tmp_path)[-1])["model"]
    # teacher_1 = m * student_0 + (1 - m) * student_1, so student_1 - teacher_1 = m (student_1 - student_0)
    for name in ("backbone.blocks.0.attn.qkv.weight", "dino_head.mlp.0.weight", "ibot_head.mlp.0.weight"):
        assert (state[f"student.{name}"] - state[f"teacher.{name}"]).abs().max() > 1e-5, name
    # the last layer is frozen during the first epoch (equal up to the EMA's rounding)
    for name in ("dino_head.last_layer.weight_v", "ibot_head.last_layer.weight_g"):
        torch.testing.assert_close(state[f"student.{name}"], state[f"teacher.{name}"], rtol=0, atol=1e-7)
    assert "supervised_head.weight" in state and not any(k.startswith("teacher.supervised") for k in state)


def test_export_then_load_gives_the_same_head_logits(manifest, tmp_path):
    overrides = tiny_overrides(manifest, **{"train.max_iters": 3, "train.eval_period_iterations": 2})
    assert train_module.main(["--output-dir", str(tmp_path), *overrides]) == 0
    assert load_model_file(tmp_path / "eval" / "step_0000002" / "model.pth").supervised_head is not None
    model_file = load_model_file(tmp_path / "model.pth")
    state = read_checkpoint_file(list_checkpoints(tmp_path)[-1])["model"]
    from dinov2.models import build_backbone

    backbone = build_backbone(**model_file.arch)
    backbone.load_state_dict(
        {k[len("teacher.backbone.") :]: v for k, v in state.items() if k.startswith("teacher.backbone.")}
    )
    backbone.eval()
    images = torch.randn(3, 3, model_file.image_size, model_file.image_size)
    with torch.no_grad():
        expected = backbone(images) @ state["supervised_head.weight"].t() + state["supervised_head.bias"]
        got = model_file.supervised_head(model_file.backbone(images))
    torch.testing.assert_close(got, expected)
    assert model_file.tree.leaves and len(model_file.tree.leaves) == expected.shape[1]
    assert model_file.image_size == 32 and model_file.hierarchy == "v1"
    # the export CLI writes the same file from the newest checkpoint
    (tmp_path / "model.pth").unlink()
    from dinov2.train import export

    assert export.main([str(tmp_path)]) == 0
    again = load_model_file(tmp_path / "model.pth")
    torch.testing.assert_close(again.supervised_head(again.backbone(images)), got)


def test_a_collapsed_dino_head_is_reported_once_per_term(manifest, tmp_path, monkeypatch):
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    build = SSLMetaArch.__init__

    def uniform_dino_head(self, *args, **kwargs):
        build(self, *args, **kwargs)
        for part in (self.student, self.teacher):  # g = 0: every logit 0, uniform over the prototypes
            part.dino_head.last_layer.weight_g.data.zero_()

    monkeypatch.setattr(SSLMetaArch, "__init__", uniform_dino_head)
    assert train_module.main(["--output-dir", str(tmp_path), *tiny_overrides(manifest, **{"train.max_iters": 3})]) == 0
    assert read_metrics(tmp_path)[-1]["dino_global"] == pytest.approx(math.log(64) * 2 / 6, abs=1e-4)
    warnings = [line for line in (tmp_path / "log.txt").read_text().splitlines() if "has collapsed" in line]
    assert [line.split()[1] for line in warnings] == ["dino_global", "dino_local"]  # logged every step, warned once


def test_nan_loss_names_the_term_and_keeps_the_last_checkpoint(manifest, tmp_path):
    overrides = tiny_overrides(manifest, **{"train.max_iters": 4, "train.checkpoint_every_iters": 2})
    assert train_module.main(["--output-dir", str(tmp_path), *overrides]) == 0
    good = list_checkpoints(tmp_path)[-1]
    # a huge learning rate on a resumed run: resume at step 4 of a longer run, then blow up
    poisoned = tiny_overrides(
        manifest, **{"train.max_iters": 12, "optim.base_lr": 1.0e30, "train.checkpoint_every_iters": 100}
    )
    with pytest.raises(
        TrainingError, match=r"loss term .*(dino_global|ibot|koleo|supervised).* is not finite at step \d+"
    ):
        train_module.main(["--output-dir", str(tmp_path), "--resume-with-changes", *poisoned])
    assert list_checkpoints(tmp_path)[-1] == good


def _parameters(output_dir):
    return read_checkpoint_file(list_checkpoints(output_dir)[-1])["model"]


def test_resume_after_sigkill_is_exact(manifest, tmp_path):
    overrides = tiny_overrides(
        manifest,
        **{
            "train.max_iters": 8,
            "train.checkpoint_every_iters": 3,
            "train.num_workers": 1,
            # what auto picks here, measured once for both runs (each measuring could differ on a busy machine)
            "compute_precision.dtype": choose_precision("auto", torch.device("cpu")).name,
            "student.drop_path_rate": 0.2,
        },  # drop path draws from the restored RNG state
    )
    straight = run_train(tmp_path / "straight", overrides)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "dinov2.train.train", "--output-dir", str(killed_dir), *overrides],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (killed_dir / "checkpoint_0000003.pth").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    remaining = list_checkpoints(killed_dir)
    assert remaining and read_checkpoint_file(remaining[-1])["step"] < 8
    resumed = run_train(killed_dir, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "resuming from" in resumed.stdout and f"at step {read_checkpoint_file(remaining[-1])['step']}" in resumed.stdout
    )

    expected, got = _parameters(tmp_path / "straight"), _parameters(killed_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [r["loss"] for r in read_metrics(tmp_path / "straight")] == [r["loss"] for r in read_metrics(killed_dir)]


def test_sigterm_writes_a_checkpoint_and_exits_75(manifest, tmp_path):
    overrides = tiny_overrides(manifest, **{"train.max_iters": 10000, "train.checkpoint_every_iters": 10000})
    process = subprocess.Popen(
        [sys.executable, "-m", "dinov2.train.train", "--output-dir", str(tmp_path), *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (tmp_path / "training_metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 75, err[-3000:]
    step = read_checkpoint_file(list_checkpoints(tmp_path)[-1])["step"]
    assert step >= 1 and f"pre-empted at step {step}, checkpoint written (SIGTERM)" in out


def test_fp16_is_refused_off_the_gpu(manifest, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        train_module.main(
            ["--output-dir", str(tmp_path), *tiny_overrides(manifest, **{"compute_precision.dtype": "fp16"})]
        )
    assert not list_checkpoints(tmp_path)


def test_fp16_steps_with_a_loss_scaler_and_resume_restores_it(manifest, tmp_path, monkeypatch):
    """The GPU's fp16 path (scale, unscale before clipping, skip on overflow, the scaler in the
    checkpoint) on the CPU with the guard lifted: a tiny model, and a tiny MFU reference matmul,
    so the CPU's slow fp16 does not matter."""
    monkeypatch.setattr(train_module, "choose_precision", lambda setting, device: Precision(setting, "test"))
    scalers, build = [], train_module.build_grad_scaler

    def first_as_built_then_elsewhere(precision, device):  # the resumed run's scaler starts at 2^30
        scalers.append(build(precision, device) if not scalers else torch.amp.GradScaler("cpu", init_scale=2.0**30))
        return scalers[-1]

    monkeypatch.setattr(train_module, "build_grad_scaler", first_as_built_then_elsewhere)
    fp16 = {"compute_precision.dtype": "fp16", "train.checkpoint_every_iters": 2}
    assert (
        train_module.main(["--output-dir", str(tmp_path), *tiny_overrides(manifest, **fp16, **{"train.max_iters": 3})])
        == 0
    )
    assert isinstance(scalers[0], torch.amp.GradScaler) and all(
        math.isfinite(r["loss"]) for r in read_metrics(tmp_path)
    )
    saved = read_checkpoint_file(list_checkpoints(tmp_path)[-1])["scaler"]
    assert saved["scale"] == scalers[0].get_scale() <= 2.0**16
    assert (
        train_module.main(["--output-dir", str(tmp_path), *tiny_overrides(manifest, **fp16, **{"train.max_iters": 4})])
        == 0
    )
    assert scalers[1].get_scale() in (saved["scale"], saved["scale"] / 2)  # restored (then at most one overflow)


def test_resuming_a_checkpoint_of_another_config_names_its_keys(manifest, tmp_path):
    overrides = tiny_overrides(manifest, **{"train.max_iters": 2, "train.checkpoint_every_iters": 2})
    assert train_module.main(["--output-dir", str(tmp_path), *overrides]) == 0
    with pytest.raises(
        CheckpointError,
        match=r"does not fit this model/config: mis-shaped keys .*"
        r"student\.dino_head\.last_layer\.weight_g \(64, 1\) vs \(32, 1\)",
    ):
        train_module.main(["--output-dir", str(tmp_path), *overrides, "train.max_iters=4", "dino.head_n_prototypes=32"])
