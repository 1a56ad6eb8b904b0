"""torchrun with 2 CPU processes (gloo, FSDP2): matches one process with the same global batch,
resumes exactly, and runs the GPU cluster's fp16 precision."""

import math
import shutil

import pytest
import torch
from conftest import REPO, make_demo_data, read_metrics, run_torchrun, run_train, tiny_overrides

from dinov2.models import build_backbone
from dinov2.models.model_file import load_model_file
from dinov2.train.checkpointing import list_checkpoints, read_checkpoint_file

TERMS = ("loss", "dino_global", "dino_local", "ibot", "supervised")


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_two_ranks_fsdp_match_one_process_with_double_batch(tmp_path, reshard_after_forward):
    manifest = make_demo_data(tmp_path / "data")
    # Per-sample augmentations are seeded by global position, so both runs see the same crops; things
    # that depend on how a batch is split over ranks are switched off: KoLeo (nearest neighbour in the
    # rank's batch), iBOT masks (drawn per batch), drop path.
    common = {
        "train.max_iters": 4,
        "dino.koleo_loss_weight": 0.0,
        "ibot.mask_sample_probability": 0.0,
        "compute_precision.dtype": "fp32",
        "train.checkpoint_every_iters": 4,
    }
    sharded = {
        **common,
        "compute_precision.reshard_after_forward": reshard_after_forward,
        "train.batch_size_per_gpu": 2,
    }
    single = run_train(tmp_path / "single", tiny_overrides(manifest, **common, **{"train.batch_size_per_gpu": 4}))
    assert single.returncode == 0, single.stderr[-3000:]

    fsdp = run_torchrun(tmp_path / "fsdp", tiny_overrides(manifest, **sharded))
    assert (
        "world size 2 (torchrun)" in fsdp.stdout
        and "FSDP2" in fsdp.stdout
        and "global batch 4 (2 per rank)" in fsdp.stdout
    )

    expected, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in expected] == [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        for term in TERMS:
            assert math.isclose(a[term], b[term], rel_tol=0, abs_tol=1e-4), (a["step"], term, a[term], b[term])
    assert got[-1]["supervised"] != got[0]["supervised"]  # the runs did train

    # the FSDP checkpoint is a full state dict, so the exported model file loads without a process group
    single_model, fsdp_model = (
        load_model_file(tmp_path / "single" / "model.pth"),
        load_model_file(tmp_path / "fsdp" / "model.pth"),
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fsdp_model.backbone(images), single_model.backbone(images), rtol=1e-3, atol=1e-3)


WITHOUT_THE_CPU_FP16_GUARD = """
import sys
from dinov2.train import train
from dinov2.utils.precision import Precision
train.choose_precision = lambda setting, device: Precision(setting, "test")  # the CPU runs fp16 slowly, not wrongly
sys.exit(train.main(sys.argv[1:]))
"""


def test_the_papers_config_in_miniature_on_two_ranks(tmp_path):
    """dinov2/configs/train/hier_vitl14.yaml as it is (a DinoBloom-format start, fp16 with a loss scaler,
    FSDP2 with SHARD_GRAD_OP, drop path 0.4, one local crop, the last layer frozen for the first
    epoch, supervised data, teacher exports) with a tiny ViT and heads, through the real trainer on
    2 CPU processes, the CPU-fp16 guard lifted in a wrapper script. (Both bugs this found are fixed: FSDP1's
    ShardedGradScaler broke fused AdamW's step; the teacher's parameters stayed gathered after its
    forward, and the EMA failed on them.)"""
    manifest = make_demo_data(tmp_path / "data")
    wrapper = tmp_path / "train_fp16_on_cpu.py"
    wrapper.write_text(WITHOUT_THE_CPU_FP16_GUARD)
    # a DinoBloom-format start ({"teacher": {"backbone.*": ...}}, positions for 224 px) with weights
    # far from a fresh init, so that where the trained teacher ends up shows where it started
    torch.manual_seed(0)
    start = build_backbone("vit_test", patch_size=8, img_size=224)
    with torch.no_grad():
        for param in start.parameters():
            param.normal_(0.0, 0.3)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in start.state_dict().items()}}, tmp_path / "DinoBloom-T.pth")
    overrides = [
        "student.arch=vit_test",
        "student.patch_size=8",
        f"student.pretrained_weights={tmp_path / 'DinoBloom-T.pth'}",
        *(
            f"{head}.{key}={value}"
            for head in ("dino", "ibot")
            for key, value in (("head_n_prototypes", 64), ("head_hidden_dim", 32), ("head_bottleneck_dim", 16))
        ),
        "crops.global_crops_size=32",
        "crops.local_crops_size=16",
        f"train.dataset_path_unsup=[{manifest}]",
        f"train.dataset_path_sup=[{manifest}]",
        "train.batch_size_per_gpu=2",
        "train.num_workers=0",
        "train.OFFICIAL_EPOCH_LENGTH=2",
        "train.log_period=1",
        "train.progress_bar=false",
        "train.eval_period_iterations=12",
        "train.checkpoint_every_iters=12",
        "optim.epochs=12",
        "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1",
    ]
    run = run_torchrun(
        tmp_path / "out",
        ["--config-file", str(REPO / "dinov2/configs/train/hier_vitl14.yaml"), *overrides],
        script=(str(wrapper),),
    )
    assert "device cpu, FSDP2; precision fp16 (test)" in run.stdout and "training finished after 24 steps" in run.stdout
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "out"))
    state = read_checkpoint_file(list_checkpoints(tmp_path / "out")[-1])
    # from 2^16 the scaler halves at each overflowing (skipped) step: this tiny model's L2-normalised
    # head bottleneck has gradients of ~10^3, so a dozen steps go to finding the scale
    assert state["step"] == 24 and 1 <= state["scaler"]["scale"] < 2.0**16
    taken = state["optimizer"]["state"]["student.backbone.blocks.0.attn.qkv.weight"]["step"].item()
    assert 24 - math.log2(2.0**16 / state["scaler"]["scale"]) == taken > 0
    # the last layer trains after its frozen first epoch (2 steps): the student leaves the teacher behind
    for name in ("dino_head.last_layer.weight_v", "ibot_head.last_layer.weight_v", "backbone.blocks.0.attn.qkv.weight"):
        assert not torch.equal(state["model"][f"student.{name}"], state["model"][f"teacher.{name}"]), name
        assert 0 < state["optimizer"]["state"][f"student.{name}"]["step"].item() <= taken
    assert "student and teacher backbones initialised from" in run.stdout
    for name in ("patch_embed.proj.weight", "blocks.1.mlp.fc2.weight"):  # the EMA moved it little from the start
        torch.testing.assert_close(
            state["model"][f"teacher.backbone.{name}"], start.state_dict()[name], rtol=0, atol=0.05
        )
    assert load_model_file(tmp_path / "out" / "eval" / "step_0000012" / "model.pth").supervised_head is not None
    assert load_model_file(tmp_path / "out" / "model.pth").backbone.patch_size == 8


def test_two_ranks_resume_exactly_and_one_process_takes_their_checkpoint(tmp_path):
    """Sharded optimizer state, RNG and sampler positions: 2 ranks resumed from step 3 end where
    the uninterrupted 2-rank run ends, bit for bit; the same checkpoint also resumes on 1 process."""
    manifest = make_demo_data(tmp_path / "data")
    overrides = tiny_overrides(
        manifest,
        **{
            "train.max_iters": 6,
            "train.checkpoint_every_iters": 3,
            "train.batch_size_per_gpu": 2,
            "student.drop_path_rate": 0.2,
        },
    )
    run_torchrun(tmp_path / "straight", overrides)
    for name in ("resumed", "one_process"):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "straight" / "checkpoint_0000003.pth", tmp_path / name)
    resumed = run_torchrun(tmp_path / "resumed", overrides)
    assert "at step 3" in resumed.stdout

    expected, got = (read_checkpoint_file(list_checkpoints(tmp_path / d)[-1]) for d in ("straight", "resumed"))
    assert expected["step"] == got["step"] == 6
    for key in expected["model"]:
        assert torch.equal(expected["model"][key], got["model"][key]), key
    for name, state in expected["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, got["optimizer"]["state"][name][field]), (name, field)
    straight_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == [straight_losses[s] for s in (4, 5, 6)]

    one = run_train(tmp_path / "one_process", [*overrides, "train.batch_size_per_gpu=4"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert (
        "at step 3" in one.stdout and read_checkpoint_file(list_checkpoints(tmp_path / "one_process")[-1])["step"] == 6
    )

    # rank 0 alone reads the file: a checkpoint that does not fit stops both ranks, naming the keys
    (tmp_path / "misfit").mkdir()
    shutil.copy(tmp_path / "straight" / "checkpoint_0000003.pth", tmp_path / "misfit")
    misfit = run_torchrun(tmp_path / "misfit", [*overrides, "dino.head_n_prototypes=32"], check=False)
    assert misfit.returncode != 0
    output = " ".join((misfit.stdout + misfit.stderr).split())  # the error lines are wrapped
    assert (
        output.count("does not fit this model/config: mis-shaped keys") == 2
        and "dino_head.last_layer.weight_g (64, 1) vs (32, 1)" in output
    )


COUNTING_DOWNLOADS = """
import os, sys, urllib.request
from dinov2.train import train
fetch = urllib.request.urlopen
def counted(*args, **kwargs):
    print("fetching on rank", os.environ["RANK"], flush=True)
    return fetch(*args, **kwargs)
urllib.request.urlopen = counted
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_url_start_is_downloaded_once_per_node_and_a_failed_one_stops_every_rank(tmp_path, monkeypatch):
    """student.pretrained_weights as a file:// URL on 2 ranks: one fetch; a missing one stops both."""
    manifest = make_demo_data(tmp_path / "data")
    torch.save(
        {"teacher": {f"backbone.{k}": v for k, v in build_backbone("vit_test", patch_size=8).state_dict().items()}},
        tmp_path / "start.pth",
    )
    wrapper = tmp_path / "train_counting_downloads.py"
    wrapper.write_text(COUNTING_DOWNLOADS)
    monkeypatch.setenv("DINO_HIER_CACHE", str(tmp_path / "cache"))
    overrides = tiny_overrides(manifest, **{"train.max_iters": 1, "train.batch_size_per_gpu": 2})
    run = run_torchrun(
        tmp_path / "out",
        [*overrides, f"student.pretrained_weights={(tmp_path / 'start.pth').as_uri()}"],
        script=(str(wrapper),),
    )
    assert run.stdout.count("fetching on rank") == 1 and "fetching on rank 0" in run.stdout
    assert run.stdout.count("student and teacher backbones initialised from") == 1  # logged by rank 0
    assert len(list((tmp_path / "cache").glob("*.pth"))) == 1  # (and its size + SHA-256 record)

    missing = (tmp_path / "missing.pth").as_uri()
    failed = run_torchrun(tmp_path / "failed", [*overrides, f"student.pretrained_weights={missing}"], check=False)
    assert failed.returncode != 0
    assert (
        "cannot download" in failed.stdout + failed.stderr
        and "failed in another process" in failed.stdout + failed.stderr
    )
