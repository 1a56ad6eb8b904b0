"""Run configuration: ``dinov2/configs/ssl_default_config.yaml`` <- run YAML <- dotted overrides.

Run YAMLs ship inside the package (``dinov2/configs/train/*.yaml``), so a non-editable install finds
them: ``--config-file`` takes a path or a packaged name (``demo``, ``train/demo.yaml``).

Every layer is merged in OmegaConf's struct mode, so a key that the defaults do not know is an
error (a typo in ``optim.base_lr`` never silently does nothing), and every numeric setting is
checked against its range in :data:`NUMERIC_SETTINGS` (a nonsense value never silently does
something else).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "ssl_default_config.yaml"


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: ``low`` <= value <= ``high`` (``<`` where ``*_open``),
    an integer when ``integer``, null when ``nullable``, the word ``auto`` when ``auto``; ``pair``: a
    list ``[a, b]`` with a <= b, each in the range."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    nullable: bool = False
    low_open: bool = False
    high_open: bool = False
    pair: bool = False
    auto: bool = False

    def admits(self, value) -> bool:
        if self.auto and value == "auto":
            return True
        if self.pair:
            single = Range(self.low, self.high, self.integer, False, self.low_open, self.high_open)
            return (
                isinstance(value, Sequence)
                and len(value) == 2
                and all(single.admits(v) for v in value)
                and value[0] <= value[1]
            )
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high == math.inf:
            bounds = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            bounds = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.pair:
            return f"a list [min, max] of two numbers {bounds}"
        return f"{kind} {bounds}" + (" or null" if self.nullable else "") + (" or auto" if self.auto else "")


COUNT = Range(1, integer=True)  # sizes, lengths, periods
OPTIONAL_COUNT = Range(1, integer=True, nullable=True)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
SCALE_PAIR = Range(0, 1, low_open=True, pair=True)

NUMERIC_SETTINGS: dict[str, Range] = {
    "student.embed_dim": OPTIONAL_COUNT,
    "student.depth": OPTIONAL_COUNT,
    "student.num_heads": OPTIONAL_COUNT,
    "student.patch_size": COUNT,
    "student.drop_path_rate": Range(0, 1, high_open=True),
    "student.layerscale": Range(0, nullable=True),
    "student.num_register_tokens": Range(0, integer=True),
    "student.interpolate_offset": Range(0, 1, high_open=True),
    "student.freeze_blocks": Range(0, integer=True),  # at most the depth: checked with the model
    "teacher.momentum_teacher": FRACTION,
    "teacher.final_momentum_teacher": FRACTION,
    "teacher.warmup_teacher_temp": POSITIVE,
    "teacher.teacher_temp": POSITIVE,
    "teacher.warmup_teacher_temp_epochs": NON_NEGATIVE,
    "dino.loss_weight": NON_NEGATIVE,
    "dino.head_n_prototypes": COUNT,
    "dino.head_bottleneck_dim": COUNT,
    "dino.head_nlayers": COUNT,
    "dino.head_hidden_dim": COUNT,
    "dino.koleo_loss_weight": NON_NEGATIVE,
    "ibot.loss_weight": NON_NEGATIVE,
    "ibot.mask_sample_probability": FRACTION,
    "ibot.mask_ratio_min_max": Range(0, 1, pair=True),
    "ibot.head_n_prototypes": COUNT,
    "ibot.head_bottleneck_dim": COUNT,
    "ibot.head_nlayers": COUNT,
    "ibot.head_hidden_dim": COUNT,
    "supervised.alpha": NON_NEGATIVE,
    "supervised.temperature": POSITIVE,
    "supervised.level_penalty": POSITIVE,
    "supervised.projection_dim": COUNT,
    "supervised.projection_hidden_dim": OPTIONAL_COUNT,
    "supervised.loss_weight": NON_NEGATIVE,
    "supervised.head_lr_multiplier": NON_NEGATIVE,
    "supervised.batch_size_per_gpu": OPTIONAL_COUNT,
    "supervised.image_size": OPTIONAL_COUNT,
    "train.batch_size_per_gpu": COUNT,
    "train.num_workers": Range(0, integer=True, auto=True),  # per rank; auto: the task's CPUs - 1
    "train.seed": Range(0, integer=True),
    "train.collective_timeout_s": POSITIVE,
    "train.OFFICIAL_EPOCH_LENGTH": COUNT,
    "train.saveckp_freq": COUNT,
    "train.checkpoint_every_iters": OPTIONAL_COUNT,
    "train.keep_checkpoints": COUNT,
    "train.eval_period_iterations": Range(0, integer=True),
    "train.keep_exports": Range(0, integer=True),  # 0 = all
    "train.log_period": COUNT,
    "train.max_iters": OPTIONAL_COUNT,
    "optim.epochs": COUNT,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.weight_decay_end": NON_NEGATIVE,
    "optim.base_lr": POSITIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.clip_grad": NON_NEGATIVE,
    "optim.freeze_last_layer_epochs": NON_NEGATIVE,
    "optim.freeze_backbone_epochs": NON_NEGATIVE,
    "optim.patch_embed_lr_mult": NON_NEGATIVE,
    "optim.layerwise_decay": Range(0, 1, low_open=True),
    "optim.adamw_beta1": Range(0, 1, high_open=True),
    "optim.adamw_beta2": Range(0, 1, high_open=True),
    "crops.global_crops_scale": SCALE_PAIR,
    "crops.local_crops_number": Range(0, integer=True),
    "crops.local_crops_scale": SCALE_PAIR,
    "crops.global_crops_size": COUNT,
    "crops.local_crops_size": COUNT,
}
"""Every numeric setting of ``ssl_default_config.yaml`` and its allowed values."""


def validate_config(cfg: DictConfig) -> None:
    """ConfigError listing every numeric setting outside its range (:data:`NUMERIC_SETTINGS`)."""
    problems = []
    for key, allowed in NUMERIC_SETTINGS.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if not allowed.admits(plain):
            problems.append(f"{key} must be {allowed}, got {plain!r}")
    if not problems and cfg.optim.warmup_epochs > cfg.optim.epochs:
        problems.append(f"optim.warmup_epochs ({cfg.optim.warmup_epochs}) exceeds optim.epochs ({cfg.optim.epochs})")
    if problems:
        raise ConfigError("invalid setting(s): " + "; ".join(problems))


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError) as error:  # yaml errors surface as ValueError subclasses
        raise ConfigError(f"cannot parse config file {path}: {error}") from None
    except Exception as error:  # yaml.YAMLError
        raise ConfigError(f"cannot parse config file {path}: {error}") from None


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source}: unknown or invalid config key {key!r} ({type(error).__name__})") from None


def find_config_file(name: str) -> Path:
    """``name`` as a path, else a packaged config: ``train/demo.yaml``, ``demo.yaml`` or ``demo``."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix == ".yaml" else f"{path.name}.yaml"
    for candidate in (CONFIGS_DIR / name, CONFIGS_DIR / "train" / stem):
        if candidate.is_file():
            return candidate
    packaged = ", ".join(sorted(p.stem for p in (CONFIGS_DIR / "train").glob("*.yaml")))
    raise ConfigError(f"config file {name} does not exist (neither a path nor a packaged config: {packaged})")


def load_config(config_file: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then ``config_file`` (if any), then ``key=value`` overrides, validated
    (:func:`validate_config`); returns a read-write config."""
    cfg = _load_yaml(DEFAULT_CONFIG)
    OmegaConf.set_struct(cfg, True)
    if config_file:
        cfg = _merge(cfg, _load_yaml(find_config_file(str(config_file))), str(config_file))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    if overrides:
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as error:
            raise ConfigError(f"cannot parse overrides {list(overrides)}: {error}") from None
        cfg = _merge(cfg, dotlist, "command line")
    OmegaConf.set_struct(cfg, True)
    validate_config(cfg)
    return cfg


def dotted_keys(config: Mapping, prefix: str = "") -> dict:
    """A nested config container flattened: ``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_from_dict(data: dict) -> DictConfig:
    """Rebuild a config saved in a checkpoint (``OmegaConf.to_container`` output)."""
    cfg = OmegaConf.create(data)
    OmegaConf.set_struct(cfg, True)
    return cfg
