"""The config system: layers, unknown keys, the packaged configs."""

import math
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, cli_exit
from omegaconf import OmegaConf

from dinov2.errors import ConfigError
from dinov2.train import train
from dinov2.utils.config import CONFIGS_DIR, DEFAULT_CONFIG, NUMERIC_SETTINGS, load_config, validate_config

# ---------------------------------------------------------------- config system


def test_config_layers_defaults_run_yaml_and_overrides():
    cfg = load_config(
        str(REPO / "dinov2/configs/train/demo.yaml"), ["optim.base_lr=0.01", "crops.local_crops_number=3"]
    )
    assert cfg.optim.base_lr == 0.01  # override beats the run YAML
    assert cfg.crops.local_crops_number == 3
    assert cfg.student.embed_dim == 64  # from the run YAML
    assert cfg.optim.adamw_beta2 == 0.999  # from the defaults


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        load_config(None, ["optim.base_lrr=0.1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.base_lr"])


def test_paper_config_matches_paper_settings():
    cfg = load_config(str(REPO / "dinov2/configs/train/hier_vitl14.yaml"))
    assert (cfg.student.arch, cfg.student.patch_size, cfg.student.drop_path_rate) == ("vit_large", 14, 0.4)
    assert cfg.student.pretrained_weights == "dinobloom_l"
    assert (cfg.crops.global_crops_size, cfg.crops.local_crops_number, cfg.crops.local_crops_size) == (224, 1, 98)
    assert list(cfg.crops.global_crops_scale) == [0.32, 1.0] and list(cfg.crops.local_crops_scale) == [0.05, 0.32]
    assert (cfg.dino.head_n_prototypes, cfg.dino.head_bottleneck_dim, cfg.dino.head_hidden_dim) == (65536, 384, 2048)
    assert cfg.dino.koleo_loss_weight == 0 and cfg.ibot.separate_head and cfg.ibot.mask_sample_probability == 0.5
    assert cfg.train.centering == "sinkhorn_knopp"
    assert (cfg.teacher.momentum_teacher, cfg.teacher.warmup_teacher_temp, cfg.teacher.teacher_temp) == (
        0.994,
        0.04,
        0.07,
    )
    assert (cfg.optim.base_lr, cfg.optim.scaling_rule, cfg.optim.warmup_epochs) == (2e-4, "sqrt_wrt_1024", 20)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.patch_embed_lr_mult) == (0.04, 0.2, 0.2)
    assert (cfg.optim.epochs, cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.train.batch_size_per_gpu) == (200, 500, 64)
    assert (cfg.supervised.loss, cfg.supervised.alpha, cfg.supervised.hierarchy) == ("hce", 0.5, "v1")
    assert cfg.compute_precision.dtype == "fp16" and cfg.train.eval_period_iterations == 1000
    assert math.isclose(cfg.optim.min_lr, 1e-6)


def test_a_packaged_config_is_found_by_name():
    by_path = load_config(str(CONFIGS_DIR / "train" / "demo.yaml"))
    for name in ("demo", "demo.yaml", "train/demo.yaml"):
        assert load_config(name) == by_path
    with pytest.raises(ConfigError, match="nosuch.*packaged config: .*demo.*hier_vitl14"):
        load_config("nosuch")


def test_a_non_editable_install_finds_its_configs(tmp_path):
    """``pip install .`` (not editable) ships the YAMLs: the installed copy loads the demo config by name
    from another folder."""
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(REPO / "dinov2", source / "dinov2", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "requirements.txt", "README.md", "LICENSE"):  # a build leaves the tree alone
        shutil.copy(REPO / name, source)
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*install, "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    code = (
        "import dinov2, sys; from dinov2.utils.config import load_config; "
        "cfg = load_config('demo'); print(dinov2.__file__); print(cfg.student.arch)"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    installed_file, arch = done.stdout.split()
    assert installed_file.startswith(str(target)) and arch == "vit_test"


# ---------------------------------------------------------------- numeric ranges


def _numeric_leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _numeric_leaves(value, f"{prefix}{key}.")
        elif any(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            for v in (value if isinstance(value, list) else [value])
        ):
            yield f"{prefix}{key}"


def test_every_numeric_setting_of_the_defaults_has_a_range():
    defaults = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG))
    assert set(_numeric_leaves(defaults)) <= set(NUMERIC_SETTINGS)
    for key in NUMERIC_SETTINGS:  # and every range names a real key (null defaults included)
        assert OmegaConf.select(OmegaConf.create(defaults), key, default="absent") != "absent", key
    for name in ("demo", "hier_vitl14", None):
        validate_config(load_config(name))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.checkpoint_every_iters=-1", "train.checkpoint_every_iters must be an integer >= 1 or null, got -1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be an integer >= 1, got 0"),
        ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu must be an integer >= 1, got 0"),
        ("train.batch_size_per_gpu=abc", "train.batch_size_per_gpu must be an integer >= 1, got 'abc'"),
        ("train.batch_size_per_gpu=2.5", "got 2.5"),
        ("train.batch_size_per_gpu=true", "got True"),
        ("optim.epochs=0", "optim.epochs must be an integer >= 1, got 0"),
        ("optim.base_lr=.inf", "optim.base_lr must be a number > 0, got inf"),
        ("teacher.teacher_temp=0", "teacher.teacher_temp must be a number > 0"),
        ("ibot.mask_sample_probability=1.5", "ibot.mask_sample_probability must be a number in [0, 1]"),
        ("crops.global_crops_scale=[0.9,0.3]", "crops.global_crops_scale must be a list [min, max]"),
        ("optim.warmup_epochs=200", "optim.warmup_epochs (200) exceeds optim.epochs (100)"),
    ],
)
def test_nonsense_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_train_cli_exits_2_on_a_bad_batch_size(tmp_path, capsys):
    argv = ["--output-dir", tmp_path, "train.dataset_path_unsup=[m.csv]", "train.batch_size_per_gpu=-4"]
    code, err = cli_exit(train.main, argv, capsys)
    assert code == 2 and "train.batch_size_per_gpu must be an integer >= 1, got -4" in err and "Traceback" not in err
