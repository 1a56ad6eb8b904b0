"""Backbone weights from any known file format into a :class:`DinoVisionTransformer`.

``load_pretrained(model, source)`` where ``source`` is a local path, a URL (``http``, ``https``,
``file``; fetched once into a cache folder, see :func:`download`) or a preset name from
:data:`PRESETS`. Formats:

* official DINOv2 backbones: flat keys (``pos_embed`` for 518 px: 1 + 37*37 = 1370 tokens);
* DinoBloom: ``{"teacher": {"backbone.<key>", "dino_head.*", "ibot_head.*"}}`` (224 px, 257 tokens);
* DINOv2 / dino_hier training checkpoints: ``{"model": {"teacher.backbone.<key>", "student.backbone.<key>",
  ...}}`` (the teacher is used) and block-chunked keys ``blocks.<chunk>.<i>.*``;
* dino_hier model files: ``{"format": "dino_hier.model", "backbone": {...}}``;
* ``.safetensors`` files with flat DINOv2 keys (e.g. ``python -m dinov2.train.export --backbone-only``).

As timm's ``checkpoint_filter_fn``, one function (:func:`filter_state_dict`) turns every format into
the model's layout (prefixes stripped, heads dropped, ``pos_embed`` resampled with DINOv2's
interpolation to the model's grid); loading is then strict and a mismatch names every missing,
unexpected and mis-shaped key. Files are always read with ``torch.load(weights_only=True)``.
"""

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dinov2.errors import CheckpointError
from dinov2.models.vision_transformer import ARCHS, DinoVisionTransformer, interpolate_pos_embed
from dinov2.utils.io import atomic_write

try:  # optional: pip install safetensors
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors
except ImportError:
    load_safetensors = None

MODEL_FILE_FORMAT = "dino_hier.model"
logger = logging.getLogger("dinov2")
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "supervised_head.", "head.")
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}{reg}_pretrain.pth"
_DINOBLOOM_URL = "https://zenodo.org/records/10908163/files/DinoBloom-{size}.pth"


@dataclass(frozen=True)
class Preset:
    """Released weights: the arch they need (``build_backbone(**arch)``) and where to download them."""

    arch: dict[str, Any]
    url: str


def _dinov2_preset(arch: str, name: str, registers: bool) -> Preset:
    layout = dict(
        arch=arch, img_size=518, patch_size=14, init_values=1e-5, ffn_layer=ARCHS[arch].get("ffn_layer", "mlp")
    )
    if registers:  # DINOv2's register models resample pos_embed by output size, with antialiasing
        layout.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    return Preset(layout, _DINOV2_URL.format(name=name, reg="_reg4" if registers else ""))


def _dinobloom_preset(arch: str, size: str) -> Preset:
    layout = dict(
        arch=arch, img_size=224, patch_size=14, init_values=1e-5, ffn_layer=ARCHS[arch].get("ffn_layer", "mlp")
    )
    return Preset(layout, _DINOBLOOM_URL.format(size=size))


PRESETS: dict[str, Preset] = {
    "dinobloom_s": _dinobloom_preset("vit_small", "S"),
    "dinobloom_b": _dinobloom_preset("vit_base", "B"),
    "dinobloom_l": _dinobloom_preset("vit_large", "L"),
    "dinobloom_g": _dinobloom_preset("vit_giant2", "G"),
}
for _size, _arch in (("s", "vit_small"), ("b", "vit_base"), ("l", "vit_large"), ("g", "vit_giant2")):
    PRESETS[f"dinov2_vit{_size}14"] = _dinov2_preset(_arch, f"dinov2_vit{_size}14", registers=False)
    PRESETS[f"dinov2_vit{_size}14_reg"] = _dinov2_preset(_arch, f"dinov2_vit{_size}14", registers=True)


def pretrained_arch(preset: str) -> dict[str, Any]:
    """The arch config of a preset's weights (a copy; override e.g. ``img_size`` as needed)."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown pretrained preset {preset!r}; known presets: {sorted(PRESETS)}")
    return dict(PRESETS[preset].arch)


def default_cache_dir() -> Path:
    """``$DINO_HIER_CACHE``, else ``~/.cache/dino_hier``."""
    return Path(os.environ.get("DINO_HIER_CACHE") or Path.home() / ".cache" / "dino_hier")


def cached_path(url: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``url`` is cached: ``<cache_dir>/<first 12 hex of sha256(url)>-<file name>``."""
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint.pth"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / f"{digest}-{name}"


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _write_record(target: Path, size: int, sha256: str) -> None:
    with atomic_write(_record_path(target), "w") as handle:
        handle.write(f"{sha256} {size}\n")


_CHECKED: set = set()  # (path, size, mtime) of cached files this process has already hashed


def _cache_is_intact(target: Path) -> bool:
    """Whether a cached download still has the size and SHA-256 recorded when it was written (hashed
    once per process and file version). A file without a record (placed there by hand) is taken as
    it is and recorded now."""
    stat = target.stat()
    version = (str(target), stat.st_size, stat.st_mtime_ns)
    if version in _CHECKED:
        return True
    size, sha256 = _size_and_sha256(target)
    record = _record_path(target)
    if not record.is_file():
        _write_record(target, size, sha256)
    elif record.read_text().split() != [sha256, str(size)]:
        return False
    _CHECKED.add(version)
    return True


def forget_download(url: str, cache_dir: str | Path | None = None) -> None:
    """Remove ``url``'s cached file and its record (the next use downloads it again)."""
    target = cached_path(url, cache_dir)
    for path in (target, _record_path(target)):
        path.unlink(missing_ok=True)


def download(url: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch ``url`` into the cache once and return its path.

    The file is written atomically, checked against the announced ``Content-Length`` (a cut-off
    transfer is an error) and recorded with its size and SHA-256 in ``<file>.sha256``; a cached file
    that no longer matches its record is downloaded again.
    """
    target = cached_path(url, cache_dir)
    if target.exists():
        if _cache_is_intact(target):
            return target
        logger.warning("cached %s does not match its recorded size and SHA-256: downloading %s again", target, url)
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url) as response, atomic_write(target) as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            if total is not None and size != total:
                raise CheckpointError(f"the download of {url} stopped after {size} of {total} bytes; try again")
    except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError
        raise CheckpointError(
            f"cannot download {url}: {error}. Without internet, download the file elsewhere and pass its local path"
        ) from error
    _write_record(target, size, digest.hexdigest())
    return target


def _download_url(source: str | Path) -> str | None:
    """The URL ``source`` is downloaded from (a URL or a preset), None for a local file."""
    text = str(source)
    if os.path.exists(text):
        return None
    if "://" in text:
        return text
    return PRESETS[text].url if text in PRESETS else None


def resolve(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Local file for ``source``: an existing path as is, a URL or a preset through the download cache."""
    url = _download_url(source)
    if url is not None:
        return download(url, cache_dir)
    text = str(source)
    if os.path.exists(text):
        return Path(text)
    raise CheckpointError(
        f"checkpoint {text!r} not found: no such file, not a URL and not a preset (presets: {sorted(PRESETS)})"
    )


def read_checkpoint(source: str | Path, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The object stored in ``source`` (path, URL or preset), read with ``torch.load(weights_only=True)``;
    a ``.safetensors`` file (tensors only by construction) as its flat dict of tensors."""
    path = resolve(source, cache_dir)
    if path.suffix == ".safetensors":
        if load_safetensors is None:
            raise CheckpointError(f"{path} is a safetensors file: pip install safetensors to read it")
        try:
            return load_safetensors(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read safetensors file {path}: {error}") from error
    try:
        # memory-mapped (zip format, torch >= 1.6): the processes of a node share the file's pages
        # instead of each holding a private copy
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(error)
        detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip() else repr(error)
        if "Unsupported global" in text:
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects (code), not only tensors; "
                f"checkpoints are loaded with torch.load(weights_only=True). Details: {detail}"
            ) from error
        url = _download_url(source)
        if url is not None:  # a bad file from the source: not kept in the cache
            forget_download(url, cache_dir)
            raise CheckpointError(
                f"cannot read checkpoint {path} downloaded from {url}: {detail}. The cached copy was removed; "
                "the next run downloads it again"
            ) from error
        raise CheckpointError(f"cannot read checkpoint {path}: {detail}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of tensors")
    return checkpoint


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` whose key starts with ``prefix``, with the prefix removed
    (``strip_prefix(model, "teacher.backbone.")``); the others are left out."""
    return {key[len(prefix) :]: value for key, value in state.items() if str(key).startswith(prefix)}


def backbone_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's flat DINOv2 keys out of any supported format (see the module docstring)."""
    if checkpoint.get("format") == MODEL_FILE_FORMAT:
        if not isinstance(checkpoint.get("backbone"), Mapping):
            raise CheckpointError("the model file has no backbone weights")
        state = dict(checkpoint["backbone"])
    elif isinstance(checkpoint.get("model"), Mapping):
        model = checkpoint["model"]
        state = strip_prefix(model, "teacher.backbone.") or strip_prefix(model, "student.backbone.") or dict(model)
    elif isinstance(checkpoint.get("teacher"), Mapping):
        state = dict(checkpoint["teacher"])
    else:
        state = dict(checkpoint)
    for prefix in ("module.", "_orig_mod.", "backbone."):  # DDP, torch.compile, DinoBloom's teacher
        body = [key for key in state if not key.startswith(_HEAD_PREFIXES)]
        if body and all(key.startswith(prefix) for key in body):
            state = strip_prefix(state, prefix)  # heads without the prefix go, as below
    state = {key: value for key, value in state.items() if not key.startswith(_HEAD_PREFIXES)}
    # DINOv2 training runs with block_chunks > 0 store blocks.<chunk>.<global index>.<param>
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key): value for key, value in state.items()}
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not state or not_tensors:
        raise CheckpointError(
            "no backbone weights found in the checkpoint"
            if not state
            else f"checkpoint entries that are not tensors: {not_tensors[:10]}"
        )
    return state


def filter_state_dict(state: Mapping[str, torch.Tensor], model: DinoVisionTransformer) -> dict[str, torch.Tensor]:
    """``state`` (from :func:`backbone_state_dict`) in ``model``'s layout: ``pos_embed`` resampled to
    the model's grid with the model's DINOv2 interpolation settings when the embed dims agree."""
    state = dict(state)
    pos_embed, target = state.get("pos_embed"), model.pos_embed
    if pos_embed is not None and pos_embed.ndim == 3 and pos_embed.shape[2] == target.shape[2]:
        if pos_embed.shape[1] != target.shape[1]:
            try:
                state["pos_embed"] = interpolate_pos_embed(
                    pos_embed, model.patch_embed.grid_size, model.interpolate_offset, model.interpolate_antialias
                )
            except ValueError as error:
                raise CheckpointError(
                    f"cannot resample the checkpoint's pos_embed {tuple(pos_embed.shape)}: {error}"
                ) from error
    return state


def describe_layout(state: Mapping[str, torch.Tensor]) -> str:
    """What a backbone state dict looks like, e.g.
    ``embed_dim 768, depth 12 (vit_base), patch size 14, MLP FFN, 0 register tokens``."""
    parts = []
    if "cls_token" in state:
        embed_dim = state["cls_token"].shape[-1]
        depth = len({int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))})
        names = [n for n, a in ARCHS.items() if a.get("embed_dim") == embed_dim and a.get("depth") == depth]
        parts.append(f"embed_dim {embed_dim}, depth {depth}" + (f" ({names[0]})" if names else ""))
    if "patch_embed.proj.weight" in state:
        parts.append(f"patch size {state['patch_embed.proj.weight'].shape[-1]}")
    parts.append("fused SwiGLU FFN" if any(".mlp.w12." in key for key in state) else "MLP FFN")
    registers = state.get("register_tokens")
    parts.append(f"{registers.shape[1] if registers is not None else 0} register tokens")
    return ", ".join(parts)


def _key_list(keys, limit: int = 12) -> str:
    """Keys for a message: non-block keys first, block keys grouped as ``blocks.{0-23}.mlp.fc1.weight``."""
    by_suffix: dict[str, list] = {}
    names = []
    for key in keys:
        match = re.match(r"blocks\.(\d+)\.(.+)", key)
        if match:
            by_suffix.setdefault(match.group(2), []).append(int(match.group(1)))
        else:
            names.append(key)
    names.sort()
    for suffix, indices in sorted(by_suffix.items()):
        spans: list = []
        for index in sorted(indices):
            if spans and index == spans[-1][1] + 1:
                spans[-1][1] = index
            else:
                spans.append([index, index])
        blocks = ",".join(str(first) if first == last else f"{first}-{last}" for first, last in spans)
        names.append(f"blocks.{blocks}.{suffix}" if len(indices) == 1 else f"blocks.{{{blocks}}}.{suffix}")
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _key_order(item) -> tuple:
    """Non-block keys first, then blocks by index."""
    match = re.match(r"blocks\.(\d+)\.(.+)", item[0])
    return (1, int(match.group(1)), match.group(2)) if match else (0, 0, item[0])


def state_dict_mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list:
    """What keeps ``state`` from loading strictly where ``expected`` is the model's state dict
    (shapes compared; a DTensor by its global shape): phrases naming the mis-shaped keys with both
    shapes, the missing and the unexpected keys; empty when it fits."""
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    misshaped = {
        key: (tuple(state[key].shape), tuple(expected[key].shape))
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    }
    problems = []
    if misshaped:
        problems.append(
            "mis-shaped keys (file vs model): "
            + "; ".join(f"{key} {file} vs {own}" for key, (file, own) in sorted(misshaped.items(), key=_key_order)[:8])
            + (f" and {len(misshaped) - 8} more" if len(misshaped) > 8 else "")
        )
    if missing:
        problems.append(f"missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_key_list(unexpected)}")
    return problems


def load_backbone_state(model: DinoVisionTransformer, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Strictly load a backbone state dict (any format's keys, already flat) into ``model``."""
    state = filter_state_dict(state, model)
    expected = model.state_dict()
    problems = state_dict_mismatches(state, expected)
    if problems:
        raise CheckpointError(
            f"checkpoint {origin} does not fit the backbone ({model.arch}: {describe_layout(expected)}); "
            f"the file looks like {describe_layout(state)}. " + ". ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def load_pretrained(
    model: DinoVisionTransformer, source: str | Path, cache_dir: str | Path | None = None
) -> DinoVisionTransformer:
    """Load backbone weights from a path, URL or preset name into ``model`` (in place; returns it)."""
    return load_backbone_checkpoint(model, read_checkpoint(source, cache_dir), source)


def load_backbone_checkpoint(
    model: DinoVisionTransformer, checkpoint: Mapping[str, Any], source: str | Path
) -> DinoVisionTransformer:
    """Load the backbone weights of an already read ``checkpoint`` (from ``source``) into ``model``."""
    origin = f"{source!s}" if str(source) not in PRESETS else f"{source} ({PRESETS[str(source)].url})"
    try:
        state = backbone_state_dict(checkpoint)
    except CheckpointError as error:
        raise CheckpointError(f"checkpoint {origin}: {error}") from error
    load_backbone_state(model, state, origin)
    return model
