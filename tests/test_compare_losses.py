"""python -m dinov2.experiments.compare_losses end to end in a tiny mode (tiny ViT, generated cells, a few
steps), and its parts: arms, pairs, verdicts, the resume guard."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_demo_data, tiny_overrides
from omegaconf import OmegaConf

from dinov2.data.synthetic_cells import generate_demo_dataset
from dinov2.errors import ConfigError
from dinov2.experiments.arms import build_arms, config_differences, parse_arm
from dinov2.experiments.comparison import default_pairs, parse_pairs, verdict
from dinov2.experiments.runner import ArmPlan, claim_folder
from dinov2.models.model_file import load_model_file
from dinov2.utils.config import load_config

METRICS = {"balanced_accuracy", "f1_weighted", "mistake_severity", "hierarchical_f1", "rare_balanced_accuracy"}


def _compare(output_dir, train_manifest, held_out, external, *extra, timeout=900):
    overrides = tiny_overrides(
        train_manifest,
        **{
            "student.freeze_blocks": 1,
            "optim.freeze_backbone_epochs": 0,
            "train.max_iters": 4,
            "train.checkpoint_every_iters": 4,
            "train.eval_period_iterations": 0,
        },
    )
    command = [
        sys.executable,
        "-m",
        "dinov2.experiments.compare_losses",
        "--sup-data",
        str(train_manifest),
        "--eval-data",
        f"held_out={held_out}",
        f"external={external}",
        "--folds",
        "3",
        "--output-dir",
        str(output_dir),
        "--bootstrap",
        "200",
        *extra,
        *overrides,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    train_manifest = make_demo_data(root / "train")  # leaf- and internal-node-labelled sources
    held_out = generate_demo_dataset(
        root / "held_out", n_per_class=4, size=32, seed=1, val_fraction=0.0, test_fraction=0.5
    )
    external = generate_demo_dataset(
        root / "external", n_per_class=3, size=32, seed=2, val_fraction=0.0, test_fraction=0.0
    )
    output_dir = root / "out"
    run = _compare(output_dir, train_manifest, held_out, external)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return output_dir, train_manifest, held_out, external


@pytest.mark.slow
def test_every_arm_is_trained_exported_evaluated_and_compared(compared):
    output_dir, _, _, _ = compared
    arms = ("ssl", "ce", "hce")
    for arm in arms:
        assert (output_dir / "arms" / arm / "model.pth").is_file()
        for name in ("held_out", "external"):
            assert (output_dir / "eval" / arm / name / "predictions.csv").is_file()
    for suffix in ("md", "json", "csv", "png"):
        assert (output_dir / f"comparison.{suffix}").stat().st_size > 0
    result = json.loads((output_dir / "comparison.json").read_text())
    assert set(result["sets"]) == {"held_out", "external"}
    for data in result["sets"].values():
        assert set(data["arms"]) == {"ssl", "ce", "hce"}
        assert set(data["pairs"]) == {"hce-ce", "hce-ssl"}
        for values in data["arms"].values():
            assert set(values) == METRICS
            for entry in values.values():
                if entry["value"] == entry["value"]:  # rare-class metric: nan without rare classes
                    assert entry["low"] <= entry["value"] <= entry["high"]
        for values in data["pairs"].values():
            entry = values["balanced_accuracy"]
            assert entry["difference"] == pytest.approx(entry["a"] - entry["b"])
            assert entry["verdict"] in ("A", "B", "unresolved")
    text = (output_dir / "comparison.md").read_text()
    assert "## In short" in text and "- held_out: hce − ce balanced accuracy" in text
    assert "## held_out" in text and "What these data support" in text and "do not say" in text
    # the arms trained apart: their exported backbones differ
    weights = {arm: load_model_file(output_dir / "arms" / arm / "model.pth").backbone.state_dict() for arm in arms}
    for a, b in (("ssl", "ce"), ("ce", "hce"), ("ssl", "hce")):
        assert not torch.equal(weights[a]["blocks.1.attn.qkv.weight"], weights[b]["blocks.1.attn.qkv.weight"]), (a, b)


@pytest.mark.slow
def test_the_arms_differ_in_the_supervised_loss_alone(compared):
    output_dir, _, _, _ = compared
    configs = {arm: OmegaConf.load(output_dir / "arms" / arm / "arm_config.yaml") for arm in ("ssl", "ce", "hce")}
    differences = config_differences(configs)
    assert set(differences) == {"supervised.loss", "supervised.loss_weight"}
    assert differences["supervised.loss"] == {"ssl": "hce", "ce": "ce", "hce": "hce"}
    assert differences["supervised.loss_weight"] == {"ssl": 0, "ce": 1.0, "hce": 1.0}
    # what the trainer ran with is what the comparison recorded
    for arm, cfg in configs.items():
        assert not config_differences(
            {"arm": cfg, "trainer": OmegaConf.load(output_dir / "arms" / arm / "config.yaml")}
        )
    # the generated data have internal-node labels: every arm's supervised rows are the leaf-labelled ones
    assert "left out for every arm" in (output_dir / "comparison.md").read_text()
    assert {cfg.train.dataset_path_sup[0] for cfg in configs.values()} == {
        str(output_dir / "data" / "supervised_leaf_labels.csv")
    }


@pytest.mark.slow
def test_a_rerun_trains_nothing_and_a_new_arm_runs_through_submitit(compared):
    output_dir, train_manifest, held_out, external = compared
    before = (output_dir / "arms" / "hce" / "model.pth").stat().st_mtime_ns
    launcher = ("--launcher", "slurm", "--cluster", "debug", "--ngpus", "0")
    run = _compare(output_dir, train_manifest, held_out, external, "--alphas", "2", *launcher)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "[hce] trained and evaluated already" in run.stdout
    assert (output_dir / "arms" / "hce" / "model.pth").stat().st_mtime_ns == before
    assert (output_dir / "arms" / "hce_alpha2" / "model.pth").is_file()
    result = json.loads((output_dir / "comparison.json").read_text())
    assert set(result["sets"]["held_out"]["pairs"]) == {"hce-ce", "hce-ssl", "hce_alpha2-ce", "hce_alpha2-ssl"}


def test_help_explains_every_option():
    run = subprocess.run(
        [sys.executable, "-m", "dinov2.experiments.compare_losses", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0
    for option in ("--sup-data", "--eval-data", "--arms", "--alphas", "--pairs", "--launcher", "--coarse-labels"):
        assert option in run.stdout


def test_arms_by_name_alpha_and_spec():
    arms = build_arms(["ssl", "ce", "hce"], alphas=[0.25], custom=["flat:supervised.alpha=0"])
    assert [arm.name for arm in arms] == ["ssl", "ce", "hce", "hce_alpha0.25", "flat"]
    assert arms[0].overrides == ("supervised.loss_weight=0",) and not arms[0].supervised
    assert arms[3].overrides == ("supervised.loss=hce", "supervised.alpha=0.25")
    assert parse_arm("supcon").overrides == ("supervised.loss=supcon",)
    assert default_pairs(arms) == [
        ("hce", "ce"),
        ("hce", "ssl"),
        ("hce_alpha0.25", "ce"),
        ("hce_alpha0.25", "ssl"),
        ("flat", "ce"),
        ("flat", "ssl"),
    ]
    assert parse_pairs("hce_alpha0.25-hce", [arm.name for arm in arms]) == [("hce_alpha0.25", "hce")]


@pytest.mark.parametrize(
    "names, custom, message",
    [
        (["hce", "ce"], ["lr:optim.base_lr=1"], "may only change supervised"),
        (["hce", "hce"], [], "given twice"),
        (["hce"], [], "at least two arms"),
        (["hce", "x/y"], [], "arm name"),
        (["hce", "hce_alphaX"], [], "followed by a number"),
    ],
)
def test_bad_arms_are_config_errors(names, custom, message):
    with pytest.raises(ConfigError, match=message):
        build_arms(names, custom=custom)


def test_unknown_pair_is_a_config_error():
    with pytest.raises(ConfigError, match="hce-supcon"):
        parse_pairs("hce-supcon", ["ssl", "ce", "hce"])


def test_verdict_reads_the_interval_the_right_way_round():
    assert verdict("balanced_accuracy", 0.01, 0.05) == "A"
    assert verdict("balanced_accuracy", -0.05, -0.01) == "B"
    assert verdict("balanced_accuracy", -0.01, 0.02) == "unresolved"
    assert verdict("mistake_severity", -0.3, -0.1) == "A"  # fewer severe mistakes: A better
    assert verdict("mistake_severity", 0.1, 0.3) == "B"
    assert verdict("rare_balanced_accuracy", float("nan"), float("nan")) == "undefined"


def test_an_arm_folder_with_another_config_is_refused(tmp_path):
    first = load_config(None, ["supervised.alpha=0.5"])
    claim_folder(ArmPlan("hce", tmp_path / "hce", first, [], {}))
    claim_folder(ArmPlan("hce", tmp_path / "hce", first, [], {}))  # the same config: fine
    changed = load_config(None, ["supervised.alpha=1.0"])
    with pytest.raises(ConfigError, match=r"supervised\.alpha: 0\.5 -> 1\.0"):
        claim_folder(ArmPlan("hce", tmp_path / "hce", changed, [], {}))
