"""Run configuration: ``dinov2/configs/ssl_default_config.yaml`` <- run YAML <- dotted overrides.

Run YAMLs ship inside the package (``dinov2/configs/train/*.yaml``), so a non-editable install finds
them: ``--config-file`` takes a path or a packaged name (``demo``, ``train/demo.yaml``).

Every layer is merged in OmegaConf's struct mode, so a key that the defaults do not know is an
error (a typo in ``optim.base_lr`` never silently does nothing).
"""

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "ssl_default_config.yaml"


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
    """Defaults, then ``config_file`` (if any), then ``key=value`` overrides; returns a read-write config."""
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
    return cfg


def config_from_dict(data: dict) -> DictConfig:
    """Rebuild a config saved in a checkpoint (``OmegaConf.to_container`` output)."""
    cfg = OmegaConf.create(data)
    OmegaConf.set_struct(cfg, True)
    return cfg
