"""The arms of a loss comparison: a name and the config overrides that make it.

Every arm trains from the same config, start weights, data, seed and schedule; an arm's own
overrides may only set ``supervised.*`` keys, so that the arms differ in the supervised loss alone
(:func:`config_differences` checks the resolved configs). Arms by name:

* ``ssl``: self-supervision only (``supervised.loss_weight=0``; no supervised batch);
* a supervised loss of the trainer (``hce``, ``ce``, and whatever else ``supervised.loss``
  accepts, e.g. ``supcon``): ``supervised.loss=<name>``; ``hce`` keeps the config's alpha;
* ``hce_alpha<value>`` (from ``--alphas``): HCE with that alpha;
* ``NAME:key=value,key=value``: any other arm, e.g. ``hce_linear:supervised.alpha=0``.
"""

import re
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from dinov2.errors import ConfigError
from dinov2.utils.config import dotted_keys, load_config

SSL = "ssl"
DEFAULT_ARMS = ("ssl", "ce", "hce")
ARM_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
ARM_PREFIX = "supervised."


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple = field(default_factory=tuple)

    @property
    def supervised(self) -> bool:
        return self.name != SSL


def named_arm(name: str) -> Arm:
    """``ssl``, ``hce_alpha<value>`` or a supervised loss name (checked when the configs are resolved)."""
    if name == SSL:
        return Arm(SSL, ("supervised.loss_weight=0",))
    if name.startswith("hce_alpha"):
        alpha = name[len("hce_alpha") :]
        try:
            float(alpha)
        except ValueError:
            raise ConfigError(f"arm {name!r}: hce_alpha must be followed by a number, e.g. hce_alpha0.25") from None
        return Arm(name, ("supervised.loss=hce", f"supervised.alpha={alpha}"))
    return Arm(name, (f"supervised.loss={name}",))


def parse_arm(spec: str) -> Arm:
    """``NAME`` (see :func:`named_arm`) or ``NAME:key=value,key=value``."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not ARM_NAME.match(name):
        raise ConfigError(f"arm name {name!r}: use letters, digits, '_', '-' and '.' only (it names a folder)")
    if not sep:
        return named_arm(name)
    overrides = tuple(item.strip() for item in rest.split(",") if item.strip())
    if not overrides or any("=" not in item for item in overrides):
        raise ConfigError(f"arm {spec!r}: write NAME:key=value[,key=value...], e.g. hce_flat:supervised.alpha=0")
    return Arm(name, overrides)


def build_arms(names, alphas=(), custom=()) -> list[Arm]:
    """The arms in order: ``names`` (comma-separated names), ``hce_alpha<a>`` per alpha, then ``custom`` specs."""
    arms = [parse_arm(name.strip()) for name in names if name.strip()]
    arms += [named_arm(f"hce_alpha{alpha:g}") for alpha in alphas]
    arms += [parse_arm(spec) for spec in custom]
    seen = set()
    for arm in arms:
        if arm.name in seen:
            raise ConfigError(f"arm {arm.name!r} is given twice")
        seen.add(arm.name)
        outside = [item for item in arm.overrides if not item.startswith(ARM_PREFIX)]
        if outside:
            raise ConfigError(
                f"arm {arm.name!r} sets {', '.join(outside)}: an arm may only change supervised.* keys, so that "
                "the arms differ in the supervised loss alone (give other settings to every arm as key=value)"
            )
    if len(arms) < 2:
        raise ConfigError(f"a comparison needs at least two arms, got {[arm.name for arm in arms]}")
    return arms


def arm_config(config_file, common: list, arm: Arm):
    """The resolved config of ``arm``: ``config_file`` <- ``common`` overrides <- the arm's own."""
    return load_config(config_file, [*common, *arm.overrides])


def config_differences(configs: dict) -> dict:
    """``{key: {arm: value}}`` for every key whose value differs between the arms' resolved configs."""
    flat = {name: dotted_keys(OmegaConf.to_container(cfg, resolve=True)) for name, cfg in configs.items()}
    keys = sorted(set().union(*(f.keys() for f in flat.values())))
    return {
        key: {name: f.get(key) for name, f in flat.items()}
        for key in keys
        if len({repr(f.get(key)) for f in flat.values()}) > 1
    }
