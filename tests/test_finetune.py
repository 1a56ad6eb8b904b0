"""Fine-tuning from a start backbone: frozen early blocks, head warm-up, prototypes from the start's
features, and the evaluations of the start and the last step that frame the training curve."""

import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import REPO, make_demo_data, read_metrics, run_torchrun, tiny_overrides

from dinov2.config.custom_hier import get_tree
from dinov2.errors import ConfigError
from dinov2.models import build_backbone
from dinov2.train import train as train_module
from dinov2.train.checkpointing import checkpoint_path, read_checkpoint_file
from dinov2.train.prototype_init import prototypes_from_points, spherical_kmeans
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config

FROZEN_BLOCKS = 1
WARMUP_STEPS = 4  # one epoch of tiny_overrides


def _finetuning(root, **extra) -> tuple[dict, list]:
    """The start backbone and the overrides of a 12-step run from it: block 0 (+ patch embedding,
    tokens) frozen, 4 steps of head warm-up, k-means prototypes; checkpoints at 4, 8 and 12."""
    manifest = make_demo_data(root / "data")
    frame = pd.read_csv(manifest)
    frame.loc[frame.index % 3 == 0, "split"] = "test"  # the evaluations' test rows
    frame.to_csv(manifest, index=False)
    torch.manual_seed(1)
    start = build_backbone("vit_test", img_size=32, patch_size=8).state_dict()
    start_file = root / "start.pth"
    torch.save(start, start_file)
    overrides = tiny_overrides(
        manifest,
        **{
            "student.pretrained_weights": start_file,
            "student.freeze_blocks": FROZEN_BLOCKS,
            "optim.freeze_backbone_epochs": 1,
            "optim.warmup_epochs": 0,
            "dino.head_init": "kmeans",
            "train.checkpoint_every_iters": 4,
            **extra,
        },
    )
    return start, overrides


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One process, evaluations every 4 steps (and at the start and the end)."""
    root = tmp_path_factory.mktemp("finetune")
    manifest = root / "data" / "manifest.csv"
    evaluations = {"train.eval_manifest": manifest, "train.eval_protocols": "knn,logreg"}
    start, overrides = _finetuning(root, **evaluations, **{"train.eval_period_iterations": 4})
    output_dir = root / "run"
    assert train_module.main(["--output-dir", str(output_dir), *overrides]) == 0
    return start, output_dir


def _is_frozen(name: str) -> bool:
    return name.startswith(("patch_embed.", "cls_token", "pos_embed", "mask_token")) or name.startswith(
        tuple(f"blocks.{i}." for i in range(FROZEN_BLOCKS))
    )


@pytest.mark.slow
def test_frozen_blocks_stay_bit_identical_in_student_and_teacher(finetuned):
    _assert_frozen_blocks_kept(*finetuned)


@pytest.mark.slow
@pytest.mark.distributed
def test_frozen_blocks_warm_up_and_kmeans_heads_on_two_fsdp_ranks(tmp_path):
    start, overrides = _finetuning(tmp_path, **{"train.batch_size_per_gpu": 2})
    run_torchrun(tmp_path / "run", overrides)
    _assert_frozen_blocks_kept(start, tmp_path / "run")
    warm = read_checkpoint_file(checkpoint_path(tmp_path / "run", WARMUP_STEPS))["model"]
    assert all(torch.equal(warm[f"teacher.backbone.{name}"], start[name]) for name in start)


def _assert_frozen_blocks_kept(start, output_dir):
    state = read_checkpoint_file(checkpoint_path(output_dir, 12))
    frozen = [name for name in start if _is_frozen(name)]
    trained = [name for name in start if not _is_frozen(name)]
    assert frozen and trained
    for name in frozen:
        for part in ("student", "teacher"):
            assert torch.equal(state["model"][f"{part}.backbone.{name}"], start[name]), (part, name)
    assert all(not torch.equal(state["model"][f"student.backbone.{name}"], start[name]) for name in trained)
    optimised = set(state["optimizer"]["state"])
    assert not {f"student.backbone.{name}" for name in frozen} & optimised  # no optimiser state
    assert {f"student.backbone.{name}" for name in trained} <= optimised


@pytest.mark.slow
def test_head_warm_up_leaves_the_backbone_then_trains_it(finetuned):
    start, output_dir = finetuned
    warm = read_checkpoint_file(checkpoint_path(output_dir, WARMUP_STEPS))
    for name in start:
        for part in ("student", "teacher"):
            assert torch.equal(warm["model"][f"{part}.backbone.{name}"], start[name]), (part, name)
    assert not any(key.startswith("student.backbone.") for key in warm["optimizer"]["state"])
    assert any(key.startswith("student.dino_head.mlp") for key in warm["optimizer"]["state"])
    later = read_checkpoint_file(checkpoint_path(output_dir, 8))["model"]
    assert not torch.equal(later["student.backbone.blocks.1.attn.qkv.weight"], start["blocks.1.attn.qkv.weight"])


@pytest.mark.slow
def test_evaluations_cover_the_start_every_export_and_the_end(finetuned):
    _, output_dir = finetuned
    curve = [r for r in read_metrics(output_dir) if "eval/logreg/accuracy" in r]
    assert [r["step"] for r in curve] == [0, 4, 8, 12]
    assert all(0 <= r["eval/logreg/accuracy"] <= 1 for r in curve)


@pytest.mark.slow
def test_kmeans_prototypes_are_unit_rows_of_the_heads_and_the_teacher_copies_them(finetuned):
    _, output_dir = finetuned
    state = read_checkpoint_file(checkpoint_path(output_dir, WARMUP_STEPS))["model"]
    # the last layer is frozen for the first epoch: still the k-means prototypes, in student and teacher
    for head in ("dino_head", "ibot_head"):
        v = state[f"student.{head}.last_layer.weight_v"]
        torch.testing.assert_close(v.norm(dim=1), torch.ones(v.shape[0]))
        torch.testing.assert_close(state[f"teacher.{head}.last_layer.weight_v"], v, rtol=0, atol=1e-6)


def test_spherical_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=1)
    points = centres.repeat_interleave(20, dim=0) + 0.02 * torch.randn(100, 16, generator=generator)
    points = torch.nn.functional.normalize(points, dim=1)
    found = spherical_kmeans(points, 5, 20, generator)
    # every true centre has a centroid within a small angle
    assert (centres @ found.T).max(dim=1).values.min() > 0.99


def test_prototypes_copy_centroids_with_distinct_noise():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(40, 8, generator=generator)
    prototypes = prototypes_from_points(points, 32, generator)  # 10 clusters, each copied 3-4 times
    assert prototypes.shape == (32, 8)
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(32))
    similarity = prototypes @ prototypes.T
    assert similarity.fill_diagonal_(0).max() < 1 - 1e-4  # no two prototypes identical
    assert (prototypes[10:20] @ prototypes[:10].T).diagonal().min() > 0.9  # a copy stays near its centroid


def test_freeze_blocks_beyond_the_depth_is_a_config_error():
    cfg = load_config(None, [*tiny_overrides("unused.csv"), "student.freeze_blocks=9"])
    with pytest.raises(ConfigError, match="freeze_blocks"):
        SSLMetaArch(cfg, get_tree("v1"))


@pytest.mark.slow
def test_ablation_script_tabulates_the_probe_over_each_variant(tmp_path):
    root = tmp_path / "data"
    manifest = make_demo_data(root)
    frame = pd.read_csv(manifest)
    frame.loc[frame.index % 3 == 0, "split"] = "test"
    frame.to_csv(manifest, index=False)
    tiny = [o for o in tiny_overrides(manifest) if not o.startswith("train.dataset_path_unsup")]
    command = [
        sys.executable,
        str(REPO / "scripts" / "finetune_ablation.py"),
        "--weights",
        "",
        "--data",
        str(manifest),
        "--output-dir",
        str(tmp_path / "out"),
        "--steps",
        "8",
        "--variant",
        "recipe=",
        "--variant",
        "naive=dino.head_init=random,student.freeze_blocks=0",
        *tiny,
        "student.freeze_blocks=1",
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    table = (tmp_path / "out" / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| recipe") or line.startswith("| naive")]
    assert len(rows) == 2 and "`dino.head_init=random`" in rows[1]
    assert all(cell.strip() in ("yes", "no") for cell in (row.split("|")[-2] for row in rows))
