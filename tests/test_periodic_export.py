"""Exports during training: the teacher alone is gathered, the newest K are kept, each is evaluated where
asked and its metrics reach the curves; on one process and on 2 gloo ranks (FSDP2)."""

import json

import pytest
import torch
from conftest import make_demo_data, read_metrics, run_torchrun, tiny_overrides
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dinov2.config.custom_hier import get_tree
from dinov2.data.synthetic_cells import generate_demo_dataset
from dinov2.models.model_file import load_model_file
from dinov2.train import periodic_export
from dinov2.train import train as train_module
from dinov2.train.checkpointing import read_checkpoint_file
from dinov2.train.periodic_export import evaluation_protocols, evaluation_record, export_for_evaluation
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def eval_manifest(tmp_path_factory):
    """Train and test rows (k-NN fitted on train, scored on test)."""
    folder = tmp_path_factory.mktemp("eval_data")
    return generate_demo_dataset(folder, n_per_class=4, size=32, seed=1, val_fraction=0.0, test_fraction=0.5)


def _assert_exported_teacher(model_path, teacher_backbone_state):
    exported = load_model_file(model_path).backbone.state_dict()
    assert set(exported) == set(teacher_backbone_state)
    for key, value in teacher_backbone_state.items():
        assert torch.equal(exported[key], value), key


def _checkpoint_teacher(path) -> dict:
    prefix = "teacher.backbone."
    state = read_checkpoint_file(path)["model"]
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def test_only_the_teacher_backbone_and_head_are_gathered_and_the_newest_k_kept(tmp_path, manifest, monkeypatch):
    cfg = load_config(None, tiny_overrides(manifest, **{"train.keep_exports": 2}))
    model = SSLMetaArch(cfg, get_tree("v1"), load_pretrained=False)
    gathered = []
    gather = periodic_export.full_model_state_dict
    monkeypatch.setattr(periodic_export, "full_model_state_dict", lambda m: gathered.append(m) or gather(m))
    for step in (10, 20, 30):
        with torch.no_grad():
            model.teacher.backbone.cls_token.fill_(step)
        assert export_for_evaluation(model, cfg, tmp_path, step, world_size=1) is None  # no eval manifest
    assert gathered == [model.teacher.backbone, model.supervised_head] * 3  # never the student or the DINO heads
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step_0000020", "step_0000030"]
    newest = tmp_path / "eval" / "step_0000030"
    assert sorted(p.name for p in newest.iterdir()) == ["MODEL_CARD.md", "model.pth"]
    _assert_exported_teacher(newest / "model.pth", model.teacher.backbone.state_dict())
    head = load_model_file(newest / "model.pth").supervised_head
    assert torch.equal(head.weight, model.supervised_head.weight)
    assert "# Model card: dino_hier `vit_test`, step 30" in (newest / "MODEL_CARD.md").read_text()


def test_a_self_supervised_run_is_evaluated_without_the_head_it_does_not_export():
    def protocols(weight, asked):
        return evaluation_protocols(
            OmegaConf.create({"train": {"eval_protocols": asked}, "supervised": {"loss_weight": weight}})
        )

    assert protocols(1.0, "knn,head") == "knn,head" and protocols(0, "knn, head") == "knn"
    assert protocols(0, "head") == "knn" and protocols(0, "logreg,head,knn_k5") == "logreg,knn_k5"


def test_evaluation_record_holds_the_mean_metrics():
    metrics = {"protocols": {"knn_k20": {"mean": {"accuracy": 0.5, "f1_macro": None, "coarse_accuracy": 0.9}}}}
    assert evaluation_record(7, metrics) == {"step": 7, "eval/knn_k20/accuracy": 0.5}
    metrics["protocols"]["knn_k20"]["interval"] = {"accuracy": {"value": 0.5, "low": 0.375, "high": 0.625}}
    assert evaluation_record(7, metrics) == {
        "step": 7,
        "eval/knn_k20/accuracy": 0.5,
        "eval/knn_k20/accuracy_low": 0.375,
        "eval/knn_k20/accuracy_high": 0.625,
    }


def _tensorboard_steps(log_dir) -> dict:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _evaluated_run(manifest, eval_manifest, **train) -> list:
    """Exports and checkpoints every 2 steps, each export evaluated, curves in jsonl and tensorboard."""
    settings = {"eval_period_iterations": 2, "checkpoint_every_iters": 2, "logger": "[jsonl,tensorboard]", **train}
    return tiny_overrides(
        manifest, **{"train.eval_manifest": eval_manifest, **{f"train.{k}": v for k, v in settings.items()}}
    )


@pytest.mark.slow
def test_training_exports_evaluates_and_logs(tmp_path, manifest, eval_manifest):
    overrides = _evaluated_run(manifest, eval_manifest, max_iters=5, keep_exports=1, keep_checkpoints=3)
    assert train_module.main(["--output-dir", str(tmp_path), *overrides]) == 0
    # with an evaluation manifest the start and the last step are evaluated too; steps 0, 2 and 4 were removed
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["step_0000005"]
    folder = tmp_path / "eval" / "step_0000005"
    _assert_exported_teacher(folder / "model.pth", _checkpoint_teacher(tmp_path / "checkpoint_0000005.pth"))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["protocols"]) == {"knn_k1", "knn_k20", "head"}

    evaluations = [r for r in read_metrics(tmp_path) if "eval/head/accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4, 5]
    assert evaluations[-1]["eval/knn_k20/accuracy"] == metrics["protocols"]["knn_k20"]["mean"]["accuracy"]
    curves = _tensorboard_steps(tmp_path / "tensorboard")
    assert curves["train/loss"] == [1, 2, 3, 4, 5] and curves["schedule/teacher_temp"] == [1, 2, 3, 4, 5]
    assert curves["speed/mfu"] == [1, 2, 3, 4, 5] and curves["eval/head/accuracy"] == [0, 2, 4, 5]
    # the final model's card carries the newest evaluation
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "# Model card: dino_hier `vit_test`, step 5" in card and "| `model.pth` |" in card
    assert f"From `{folder / 'metrics.json'}`" in card and "| knn_k20 |" in card
    assert "From `" in (folder / "MODEL_CARD.md").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_export_the_teacher_and_rank0_alone_logs(tmp_path, manifest, eval_manifest):
    overrides = _evaluated_run(manifest, eval_manifest, max_iters=3, batch_size_per_gpu=2)
    run = run_torchrun(tmp_path, overrides)
    assert "FSDP2" in run.stdout
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step_0000000", "step_0000002", "step_0000003"]
    _assert_exported_teacher(
        tmp_path / "eval" / "step_0000002" / "model.pth", _checkpoint_teacher(tmp_path / "checkpoint_0000002.pth")
    )
    assert "2 processes" in (tmp_path / "eval" / "step_0000002" / "MODEL_CARD.md").read_text()
    assert [r["step"] for r in read_metrics(tmp_path) if "eval/head/accuracy" in r] == [0, 2, 3]
    assert _tensorboard_steps(tmp_path / "tensorboard")["train/loss"] == [1, 2, 3]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1  # one event file: rank 0 alone writes
