"""The supervised terms in the trainer: the student's classifier or projection head trains the
backbone, the exported head learns on the teacher's detached features; short runs through the real
trainer per contrastive loss, and 2 FSDP ranks = 1 process."""

import csv
import math

import pytest
import torch
from conftest import make_demo_data, read_metrics, run_torchrun, run_train, tiny_overrides

from dinov2.config.custom_hier import get_tree
from dinov2.errors import ConfigError
from dinov2.models.model_file import load_model_file
from dinov2.train.checkpointing import list_checkpoints, read_checkpoint_file
from dinov2.train.periodic_export import export_folder
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config


def _config(**extra):
    """The trainer's tiny test model (no data read: SSLMetaArch alone), no local crops."""
    return load_config(None, tiny_overrides("unused.csv", **{"crops.local_crops_number": 0, **extra}))


def _batch(n_images: int = 4) -> dict:
    masks = torch.zeros(2 * n_images, 16, dtype=torch.bool)
    masks[:n_images, :5] = True
    return {
        "collated_global_crops": torch.randn(2 * n_images, 3, 32, 32),
        "collated_masks": masks,
        "n_masked_patches": torch.tensor([int(masks.sum())]),
        "masks_weight": None,
    }


def _supervised(tree):
    names = ("neutrophil_band", "neutrophil_band", "monocyte", "monocyte", "lymphoblast", "granulocytic_mature")
    return torch.randn(len(names), 3, 32, 32), torch.tensor([tree.index(n) for n in names])


def _grads(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    parts = {"backbone": model.student.backbone, "projection": model.projection_head, "head": model.supervised_head}
    return {
        name: any(p.grad is not None and p.grad.any() for p in part.parameters())
        for name, part in parts.items()
        if part is not None
    }


@pytest.mark.parametrize("loss", ["supcon", "hier_supcon"])
def test_contrastive_loss_trains_backbone_and_projection_and_the_head_learns_detached(loss):
    tree = get_tree("v1")
    cfg = _config(**{"supervised.loss": loss, "supervised.projection_dim": 8})
    model = SSLMetaArch(cfg, tree)
    images, labels = _supervised(tree)
    if loss == "supcon":
        labels[-1] = tree.index("basophil")  # SupCon takes leaf labels only
    total, terms = model.forward_losses(_batch(), (images, labels), teacher_temp=0.04)
    assert model.projection_head[-1].out_features == 8
    assert terms.keys() >= {"supervised", "supervised_head"} and terms["supervised"] > 0
    assert _grads(model, terms["supervised"]) == {"backbone": True, "projection": True, "head": False}
    assert _grads(model, terms["supervised_head"]) == {"backbone": False, "projection": False, "head": True}
    assert "projection_head.0.weight" in model.state_dict()


@pytest.mark.parametrize("loss", ["hce", "ce"])
def test_the_student_classifier_trains_the_backbone_and_the_exported_head_reads_the_teacher(loss):
    tree = get_tree("v1")
    model = SSLMetaArch(_config(**{"supervised.loss": loss}), tree)
    with torch.no_grad():  # a teacher that lags the student, as during training
        for param in model.teacher.backbone.parameters():
            param.add_(0.05 * torch.randn_like(param))
    images, labels = _supervised(tree)
    labels[-1] = tree.index("basophil")  # flat CE takes leaf labels only
    _, terms = model.forward_losses(_batch(), (images, labels), teacher_temp=0.04)
    classifier = model.student.classifier
    assert _grads(model, terms["supervised"])["backbone"] and classifier.weight.grad.any()
    assert _grads(model, terms["supervised_head"]) == {"backbone": False, "head": True}
    assert classifier.weight.grad is None
    model.eval()
    with torch.no_grad():
        teacher_cls = model.teacher.backbone.forward_clstoken(images)
        student_cls = model.student.backbone.forward_clstoken(images)
    expected = model.supervised_loss(model.supervised_head(teacher_cls), labels)
    torch.testing.assert_close(terms["supervised_head"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, model.supervised_loss(model.supervised_head(student_cls), labels))


def test_hce_runs_have_no_projection_head_and_unknown_losses_are_named():
    model = SSLMetaArch(_config(), get_tree("v1"))
    assert model.projection_head is None and model.supervised_modules() == [model.supervised_head]
    with pytest.raises(ConfigError, match="'focal'; choose one of hce, ce, supcon, hier_supcon"):
        SSLMetaArch(_config(**{"supervised.loss": "focal"}), get_tree("v1"))


def _leaf_manifest(manifest, tree):
    """The demo manifest without its internal-node labels (flat SupCon takes leaves only)."""
    rows = [row for row in csv.DictReader(open(manifest)) if tree.is_leaf(row["label"])]
    path = manifest.with_name("leaves.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo_data"))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["supcon", "hier_supcon"])
def test_a_short_run_per_loss_through_the_trainer(manifest, tmp_path, loss):
    data = _leaf_manifest(manifest, get_tree("v1")) if loss == "supcon" else manifest
    overrides = {
        "supervised.loss": loss,
        "supervised.batch_size_per_gpu": 8,
        "supervised.sampler": "class_balanced",
        "train.max_iters": 3,
        "train.eval_period_iterations": 2,
    }
    run = run_train(tmp_path, tiny_overrides(data, **overrides))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"supervised {loss} x 1.00" in (tmp_path / "log.txt").read_text()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["supervised"]) and math.isfinite(r["supervised_head"]) for r in records)
    assert any(r["supervised"] > 0 for r in records)
    state = read_checkpoint_file(list_checkpoints(tmp_path)[-1])["model"]
    assert "projection_head.2.weight" in state
    # the classifier head is exported as with HCE: predict and the head protocol keep working
    model = load_model_file(tmp_path / "model.pth")
    assert model.supervised_head is not None
    torch.testing.assert_close(model.supervised_head.weight, state["supervised_head.weight"])
    assert load_model_file(export_folder(tmp_path, 2) / "model.pth").supervised_head is not None


@pytest.mark.slow
@pytest.mark.distributed
def test_two_fsdp_ranks_match_one_process_with_the_whole_batch(manifest, tmp_path):
    """Each rank's supervised rows join one contrastive batch: 2 ranks x 4 labelled images give the
    terms of 1 process x 8, step by step (so the gradients matched too)."""
    common = {  # as in test_train_fsdp: nothing that depends on how a batch is split over ranks
        "supervised.loss": "hier_supcon",
        "train.max_iters": 3,
        "dino.koleo_loss_weight": 0.0,
        "ibot.mask_sample_probability": 0.0,
        "train.checkpoint_every_iters": 3,
    }
    single = run_train(
        tmp_path / "single",
        tiny_overrides(manifest, **common, **{"train.batch_size_per_gpu": 4, "supervised.batch_size_per_gpu": 8}),
    )
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = tiny_overrides(manifest, **common, **{"train.batch_size_per_gpu": 2, "supervised.batch_size_per_gpu": 4})
    fsdp = run_torchrun(tmp_path / "fsdp", sharded)
    assert "FSDP2" in fsdp.stdout and "global batch 4 (2 per rank)" in fsdp.stdout
    expected, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in expected] == [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        for term in ("loss", "dino_global", "ibot", "supervised", "supervised_head"):
            assert math.isclose(a[term], b[term], rel_tol=0, abs_tol=1e-4), (a["step"], term, a[term], b[term])
    assert got[-1]["supervised"] != got[0]["supervised"]


@pytest.mark.slow
@pytest.mark.distributed
def test_the_papers_config_in_miniature_with_hier_supcon(manifest, tmp_path):
    """hier_vitl14.yaml (fp16 with a loss scaler, FSDP2 SHARD_GRAD_OP, one local crop, drop path 0.4)
    with a tiny ViT and supervised.loss=hier_supcon on 2 CPU ranks, the CPU-fp16 guard lifted."""
    from test_train_fsdp import WITHOUT_THE_CPU_FP16_GUARD

    wrapper = tmp_path / "train_fp16_on_cpu.py"
    wrapper.write_text(WITHOUT_THE_CPU_FP16_GUARD)
    paper = {
        "supervised.loss": "hier_supcon",
        "student.pretrained_weights": "null",
        "student.drop_path_rate": 0.4,
        "compute_precision.dtype": "fp16",
        "crops.local_crops_number": 1,
        "dino.koleo_loss_weight": 0.0,
        "train.batch_size_per_gpu": 2,
        "train.max_iters": 4,
    }
    config = ["--config-file", "hier_vitl14", *tiny_overrides(manifest, **paper)]
    run = run_torchrun(tmp_path / "out", config, script=(str(wrapper),))
    assert "FSDP2; precision fp16" in run.stdout and "supervised hier_supcon" in run.stdout
    records = read_metrics(tmp_path / "out")
    assert len(records) == 4 and all(math.isfinite(r["supervised"]) for r in records)
    assert load_model_file(tmp_path / "out" / "model.pth").supervised_head is not None
