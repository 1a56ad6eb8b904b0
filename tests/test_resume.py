"""Resuming into an output folder: config changes are checked and recorded; a damaged newest
checkpoint falls back to the newest one that loads."""

import shutil

import pytest
from conftest import cli_exit, make_demo_data, run_torchrun, tiny_overrides

from dinov2.errors import CheckpointError, ConfigError
from dinov2.train import export
from dinov2.train import train as train_module
from dinov2.train.checkpointing import list_checkpoints, read_checkpoint_file
from dinov2.train.config_history import config_changes


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo_data"))


def _train(output_dir, overrides, *flags) -> int:
    return train_module.main(["--output-dir", str(output_dir), *flags, *overrides])


def _damage(path):
    path.write_bytes(path.read_bytes()[:1000])


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2."""
    overrides = tiny_overrides(manifest, **{"train.max_iters": 2, "train.checkpoint_every_iters": 1})
    out = tmp_path_factory.mktemp("trained") / "run"
    assert _train(out, overrides) == 0
    return out, overrides


@pytest.fixture()
def finished_run(trained, tmp_path):
    """A copy of the 2-step run for one test."""
    source, overrides = trained
    shutil.copytree(source, tmp_path / "run")
    return tmp_path / "run", overrides


def test_a_changed_experiment_is_refused_unless_asked_and_then_recorded(finished_run, capsys):
    out, overrides = finished_run
    config_before = (out / "config.yaml").read_text()
    code, err = cli_exit(train_module.main, ["--output-dir", out, *overrides, "optim.base_lr=1.25"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "changed config: optim.base_lr 0.05 -> 1.25" in err and "--resume-with-changes" in err
    assert (out / "config.yaml").read_text() == config_before  # the refused config overwrote nothing

    assert _train(out, [*overrides, "optim.base_lr=1.25"], "--resume-with-changes") == 0
    assert "base_lr: 1.25" in (out / "config.yaml").read_text()
    history = sorted(p.name for p in (out / "config_history").iterdir())
    assert history == ["001_step0000000.yaml", "002_step0000002.yaml"]
    header = (out / "config_history" / history[1]).read_text().splitlines()[:2]
    assert "at step 2" in header[0] and "optim.base_lr 0.05 -> 1.25" in header[1]


def test_a_changed_data_set_or_model_is_refused_even_when_asked(finished_run, tmp_path):
    out, overrides = finished_run
    other = tmp_path / "other.csv"
    other.write_text("path,label,dataset,split\n")
    with pytest.raises(ConfigError, match=r"holds a run of another data set or model: train.dataset_path_unsup"):
        _train(out, [*overrides, f"train.dataset_path_unsup=[{other}]"], "--resume-with-changes")
    with pytest.raises(ConfigError, match=r"student.pretrained_weights '' -> "):
        _train(out, [*overrides, f"student.pretrained_weights={other}"], "--resume-with-changes")


def test_operational_changes_need_no_permission(finished_run):
    out, overrides = finished_run
    assert _train(out, [*overrides, "train.num_workers=1", "train.max_iters=3", "train.log_period=5"]) == 0
    assert read_checkpoint_file(list_checkpoints(out)[-1])["step"] == 3
    assert "changes against 001_step0000000.yaml: train.log_period 1 -> 5, train.max_iters 2 -> 3" in (
        (out / "config_history" / "002_step0000002.yaml").read_text()
    )


def test_the_global_batch_is_compared_not_the_per_gpu_batch():
    saved = {"train": {"batch_size_per_gpu": 2, "dataset_path_unsup": ["m.csv"]}, "supervised": {}}
    same = {"train": {"batch_size_per_gpu": 4, "dataset_path_unsup": ["./m.csv"]}, "supervised": {}}
    assert config_changes(saved, same, saved_world_size=2, world_size=1) == {}
    assert config_changes(saved, same, saved_world_size=1, world_size=1) == {"train.batch_size_per_gpu": (2, 4)}


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished_run, capsys):
    out, overrides = finished_run
    newest = list_checkpoints(out)[-1]
    _damage(newest)

    assert export.main([str(out), "--out", str(out / "exported.pth")]) == 0
    assert "exported " + str(list_checkpoints(out)[0]) in capsys.readouterr().out

    assert _train(out, overrides) == 0
    log = (out / "log.txt").read_text()
    assert f"skipping damaged checkpoint {newest}" in log and "resuming from" in log and "at step 1" in log
    assert (out / (newest.name + ".damaged")).is_file()
    assert [read_checkpoint_file(p)["step"] for p in list_checkpoints(out)] == [1, 2]


def test_no_readable_checkpoint_is_an_error_naming_them(finished_run):
    out, overrides = finished_run
    for path in list_checkpoints(out):
        _damage(path)
    with pytest.raises(CheckpointError, match=r"no readable training checkpoint: .*0000002.pth.*--no-resume"):
        _train(out, overrides)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_skip_a_damaged_checkpoint_and_refuse_a_changed_config_together(manifest, tmp_path):
    """Rank 0 alone reads the files: both ranks skip the damaged one, and both stop on a refused config."""
    overrides = tiny_overrides(
        manifest, **{"train.max_iters": 2, "train.checkpoint_every_iters": 1, "train.batch_size_per_gpu": 2}
    )
    out = tmp_path / "run"
    run_torchrun(out, overrides)
    _damage(list_checkpoints(out)[-1])
    resumed = run_torchrun(out, overrides)
    assert "skipping damaged checkpoint" in resumed.stdout and "at step 1" in resumed.stdout
    assert read_checkpoint_file(list_checkpoints(out)[-1])["step"] == 2

    refused = run_torchrun(out, [*overrides, "optim.base_lr=0.5"], check=False)
    assert refused.returncode != 0
    output = " ".join((refused.stdout + refused.stderr).split())
    assert output.count("changed config: optim.base_lr 0.05 -> 0.5") == 2
    assert "exitcode : 2" in output and "checkpointing.py" not in output  # torchrun's traceback only, none of ours
