"""Training curves: one record interface, written to jsonl, tensorboard and wandb; resume drops the repeated steps."""

import importlib.machinery
import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dinov2.errors import ConfigError
from dinov2.utils import loggers
from dinov2.utils.loggers import TrainingCurves, scalar_tag, scalars

CONFIG = {"train": {"batch_size_per_gpu": 4}, "student": {"arch": "vit_test"}}


def _record(step, loss):
    return {"step": step, "loss": loss, "ibot": loss / 2, "lr": 1e-3 * step, "mfu": 0.25, "images_per_s": 10.0}


def _tensorboard_scalars(log_dir) -> dict:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_record_keys_become_grouped_curves():
    assert [scalar_tag(k) for k in ("loss", "dino_local", "lr", "teacher_temp", "mfu", "eval/knn_k20/accuracy")] == [
        "train/loss",
        "train/dino_local",
        "schedule/lr",
        "schedule/teacher_temp",
        "speed/mfu",
        "eval/knn_k20/accuracy",
    ]
    record = {"step": 3, "loss": 1.5, "note": "text", "flag": True, "bad": float("nan"), "momentum": 0.99}
    assert scalars(record) == {"train/loss": 1.5, "schedule/momentum": 0.99}


def test_unknown_or_uninstalled_logger_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown logger\(s\) \['tensorbord'\]"):
        TrainingCurves(["jsonl", "tensorbord"], tmp_path, CONFIG)
    monkeypatch.setattr(loggers, "SummaryWriter", None)
    with pytest.raises(ConfigError, match=r"tensorboard \(pip install tensorboard\)"):
        TrainingCurves("tensorboard", tmp_path, CONFIG, enabled=False)  # every rank checks


def test_tensorboard_curves_live_and_resumed(tmp_path):
    curves = TrainingCurves(["jsonl", "tensorboard"], tmp_path, CONFIG)
    curves.truncate_after(1)
    for step in (1, 2, 3):
        curves.write(_record(step, 10.0 - step))
    # flushed after every record: readable while the run goes on
    assert _tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    curves.close()

    # resumed from the checkpoint of step 1: steps 2 and 3 are repeated with other values
    resumed = TrainingCurves(["jsonl", "tensorboard"], tmp_path, CONFIG)
    resumed.truncate_after(2)
    for step in (2, 3, 4):
        resumed.write(_record(step, 100.0 + step))
    resumed.write({"step": 4, "eval/knn_k20/accuracy": 0.5})
    resumed.close()
    curves = _tensorboard_scalars(tmp_path / "tensorboard")
    assert curves["train/loss"] == [(1, 9.0), (2, 102.0), (3, 103.0), (4, 104.0)]
    assert curves["schedule/lr"][-1] == (4, pytest.approx(4e-3)) and curves["speed/mfu"][0] == (1, 0.25)
    assert curves["eval/knn_k20/accuracy"] == [(4, 0.5)]
    lines = [json.loads(line) for line in (tmp_path / "training_metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in lines] == [(1, 9.0), (2, 102.0), (3, 103.0), (4, 104.0), (4, None)]


def test_other_ranks_write_nothing(tmp_path, fake_wandb):
    curves = TrainingCurves(["jsonl", "tensorboard", "wandb"], tmp_path, CONFIG, enabled=False)
    curves.truncate_after(1)
    curves.write(_record(1, 1.0))
    curves.close()
    assert list(tmp_path.iterdir()) == [] and fake_wandb == []


class _FakeRun:
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **init: runs.append(_FakeRun(**init)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return runs


def test_wandb_run_per_output_folder_resumed_by_its_id(tmp_path, fake_wandb):
    out = tmp_path / "run_a"
    out.mkdir()
    curves = TrainingCurves(["wandb"], out, CONFIG)
    curves.write(_record(1, 2.0))
    curves.close()
    (run,) = fake_wandb
    assert run.init["project"] == "dino_hier" and run.init["name"] == "run_a" and run.init["config"] == CONFIG
    assert run.init["resume"] == "allow" and run.init["dir"] == str(out)
    assert run.logged == [(1, scalars(_record(1, 2.0)))] and run.finished
    assert (out / "wandb_run_id.txt").read_text().strip() == run.init["id"]

    resumed = TrainingCurves(["wandb"], out, CONFIG)
    resumed.write(_record(2, 1.0))
    assert fake_wandb[-1].init["id"] == run.init["id"]  # the same run continues
    assert (out / "training_metrics.jsonl").exists()  # jsonl is always written


def test_wandb_offline_without_an_account(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    curves = TrainingCurves(["wandb"], tmp_path, CONFIG)
    for step in (1, 2):
        curves.write(_record(step, 3.0 - step))
    curves.close()
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
