"""``MODEL_CARD.md`` beside every exported model, written from what the run knows (never by hand).

The card states the files and how to load them (the exact timm call for a backbone file), the
architecture, the start weights, the hierarchy with its leaves (leaf ``i`` = row ``i`` of the
supervised head), the training manifests with image counts per data set and per node, the
precision, the step count, the config keys that differ from the defaults, and the latest
evaluation summary (an ``eval_hier`` ``metrics.json``) if there is one.

    python -m dinov2.train.model_card OUT/MODEL_CARD.md --evaluation EVAL_DIR/metrics.json

replaces the evaluation section of an existing card after a later ``eval_hier`` run.
"""

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from dinov2.config.custom_hier import get_tree
from dinov2.data.manifest import read_manifests, resolve_manifest_labels
from dinov2.data.transforms import NORMALIZATION_MEAN, NORMALIZATION_STD
from dinov2.errors import ConfigError, DataError, LabelError
from dinov2.hierarchy import Tree
from dinov2.models import arch_config
from dinov2.models.backbone_file import timm_snippet
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import PRESETS
from dinov2.train.ssl_meta_arch import head_loss, supervised_term_on
from dinov2.utils.cli import run_cli
from dinov2.utils.config import dotted_keys, load_config
from dinov2.utils.io import atomic_write

CARD_NAME = "MODEL_CARD.md"
EVALUATION_HEADING = "## Evaluation"
# file kinds: what each export holds
MODEL_FILE, BACKBONE_FILE = "model", "backbone"
KNOWN_FILES = {"model.pth": MODEL_FILE, "backbone.pth": BACKBONE_FILE, "backbone.safetensors": BACKBONE_FILE}
UNLABELLED = "*unlabelled or ignored*"
SUMMARY_METRICS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "f1_macro": "macro F1",
    "hierarchical_f1": "hier. F1",
    "mistake_severity": "mistake severity",
}


def config_changes(cfg) -> list[tuple[str, object, object]]:
    """``(dotted key, default, this run's value)`` for every key that differs from the defaults."""
    defaults = dotted_keys(OmegaConf.to_container(load_config(), resolve=True))
    ours = dotted_keys(OmegaConf.to_container(cfg, resolve=True))
    return [(key, defaults.get(key), value) for key, value in ours.items() if defaults.get(key) != value]


def _files_section(files: Mapping[str, str], arch: dict) -> list[str]:
    lines = ["## Files", "", "| file | contents |", "|---|---|"]
    for name, kind in sorted(files.items()):
        if kind == MODEL_FILE:
            lines.append(
                f"| `{name}` | dino_hier model file: teacher backbone, supervised head, tree, image size and "
                "normalisation (`dinov2.models.model_file.load_model_file`, `python -m dinov2.eval.eval_hier "
                f"--model {name}`) |"
            )
        else:
            lines.append(f"| `{name}` | teacher backbone alone, official DINOv2 keys (timm, DINOv2, DinoBloom) |")
    backbones = [name for name, kind in sorted(files.items()) if kind == BACKBONE_FILE]
    lines += ["", "Load the backbone with timm (in this folder; its features equal this project's):", "", "```python"]
    lines += [timm_snippet(backbones[0] if backbones else "backbone.safetensors", arch), "```"]
    if not backbones:
        lines += [
            "",
            "(write `backbone.safetensors` first: `python -m dinov2.train.export OUTPUT_DIR --backbone-only "
            "--format safetensors`)",
        ]
    return lines


def _architecture_section(cfg, backbone: DinoVisionTransformer, tree: Tree) -> list[str]:
    arch = arch_config(backbone)
    n_params = sum(p.numel() for p in backbone.parameters())
    image_size = cfg.supervised.image_size or cfg.crops.global_crops_size
    layerscale = f"LayerScale {arch['init_values']:g}" if arch["init_values"] else "no LayerScale"
    source = cfg.student.pretrained_weights
    start = "random initialisation"
    if source:
        start = f"`{source}`" + (f" ({PRESETS[source].url})" if source in PRESETS else "")
    return [
        "## Architecture",
        "",
        f"- backbone: `{arch['arch']}`, embed dim {arch['embed_dim']}, depth {arch['depth']}, "
        f"{arch['num_heads']} heads, patch {arch['patch_size']}, {arch['num_register_tokens']} register tokens, "
        f"{arch['ffn_layer']} FFN (ratio {arch['mlp_ratio']:g}), {layerscale}; {n_params / 1e6:.2f} M parameters",
        f"- position embeddings for {arch['img_size']} px ({arch['img_size'] // arch['patch_size']}² patches); "
        f"input {image_size} × {image_size} px, normalised with mean {list(NORMALIZATION_MEAN)} and std "
        f"{list(NORMALIZATION_STD)}",
        head_line(cfg, arch["embed_dim"], len(tree.leaves)),
        f"- start weights: {start}",
    ]


def head_line(cfg, embed_dim: int, n_leaves: int) -> str:
    """What the model file's supervised head is and how it was trained (none without the supervised term)."""
    supervised = cfg.supervised
    if not supervised_term_on(cfg):
        return "- supervised head: none (self-supervised run: `supervised.loss_weight` 0)"
    return (
        f"- supervised head: Linear({embed_dim} → {n_leaves} leaves), trained with {head_loss(supervised.loss)} "
        "on the teacher "
        f"backbone's features; the backbone's supervised term: {supervised.loss} (α {supervised.alpha:g}, "
        f"weight {supervised.loss_weight:g})"
    )


def _hierarchy_section(cfg, tree: Tree) -> list[str]:
    lines = [
        f"## Hierarchy `{cfg.supervised.hierarchy}`",
        "",
        f"{len(tree.nodes)} nodes, {len(tree.leaves)} leaves, depth {tree.max_depth}. "
        "Leaf *i* is output *i* of the supervised head.",
        "",
    ]
    for name in tree.preorder():
        leaf = f" — leaf {tree.leaves.index(name)}" if tree.is_leaf(name) else ""
        lines.append(f"{'  ' * (tree.depth(name) - 1)}- {name}{leaf}")
    return lines


def _count_table(frame: pd.DataFrame, labels: np.ndarray, tree: Tree) -> list[str]:
    """Markdown rows: images labelled at each node (tree order, nodes without any left out) per data set."""
    nodes = pd.Series([tree.nodes[label] if label >= 0 else None for label in labels], dtype=object)
    counts = pd.crosstab(nodes.fillna(UNLABELLED), frame["dataset"].to_numpy())
    datasets = list(counts.columns)
    lines = ["| node | " + " | ".join(datasets) + " | total |", "|---" * (len(datasets) + 2) + "|"]
    rows = [name for name in (*tree.preorder(), UNLABELLED) if name in counts.index]
    for name in rows:
        row = counts.loc[name]
        shown = f"{name} (leaf)" if name in tree and tree.is_leaf(name) else name
        lines.append(f"| {shown} | " + " | ".join(str(int(row[d])) for d in datasets) + f" | {int(row.sum())} |")
    totals = counts.sum(axis=0)
    lines.append("| **all images** | " + " | ".join(str(int(totals[d])) for d in datasets) + f" | {len(frame)} |")
    return lines


def _data_section(cfg, tree: Tree) -> list[str]:
    split = cfg.train.split
    unsupervised = list(cfg.train.dataset_path_unsup)
    supervised = list(cfg.train.dataset_path_sup or unsupervised) if supervised_term_on(cfg) else None
    if supervised == unsupervised:
        streams = [("self-supervised and supervised batches", unsupervised)]
    else:
        streams = [("self-supervised batch", unsupervised)] + [("supervised batch", supervised)] * bool(supervised)
    lines = ["## Training data", ""]
    for what, paths in streams:
        lines += [f"### {what}: {', '.join(f'`{p}`' for p in paths) or 'no manifest'}", ""]
        try:
            frame = read_manifests(paths)
            if split is not None:
                frame = frame[frame["split"] == split].reset_index(drop=True)
            labels = resolve_manifest_labels(frame, tree)
        except (DataError, LabelError, ConfigError) as error:
            lines += [f"Not readable where this card was written: {error}", ""]
            continue
        rows = f"rows with split `{split}`" if split is not None else "all rows"
        lines += [f"{len(frame)} images ({rows}); images labelled at each node, per data set:", ""]
        lines += [*_count_table(frame, labels, tree), ""]
    return lines[:-1]


@dataclass(frozen=True)
class TrainingProgress:
    """What the run knows at an export besides its config: the step, the number of processes and the
    precision record (``{"name": "bf16", "reason": ...}``, as the checkpoint stores it)."""

    step: int
    world_size: int | None = None
    precision: Mapping | None = None

    @classmethod
    def of_checkpoint(cls, state: Mapping) -> "TrainingProgress":
        return cls(state["step"], state.get("world_size"), state.get("precision"))


def _training_section(cfg, progress: TrainingProgress) -> list[str]:
    step, world_size = progress.step, progress.world_size
    max_iter = cfg.train.max_iters or cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    per_rank = cfg.train.batch_size_per_gpu
    batch = f"{per_rank} per process"
    if world_size:
        batch = f"{per_rank * world_size} ({batch} × {world_size} processes)"
    sup_batch = cfg.supervised.batch_size_per_gpu or per_rank
    precision = f"`compute_precision.dtype={cfg.compute_precision.dtype}`"
    if progress.precision:
        precision = f"{progress.precision['name']} ({precision}; {progress.precision['reason']})"
    return [
        "## Training",
        "",
        f"- steps: {step} of {max_iter}"
        + (" (train.max_iters; the schedules span " if cfg.train.max_iters else " (")
        + f"{cfg.optim.epochs} epochs × {cfg.train.OFFICIAL_EPOCH_LENGTH} iterations)",
        f"- global batch: {batch}; supervised batch {sup_batch} per process",
        f"- precision: {precision}; FSDP gradient reduction in {cfg.compute_precision.reduce_dtype}",
        f"- crops: 2 global × {cfg.crops.global_crops_size} px, {cfg.crops.local_crops_number} local × "
        f"{cfg.crops.local_crops_size} px",
    ]


def _config_section(cfg) -> list[str]:
    changes = config_changes(cfg)
    lines = ["## Config changes against the defaults", ""]
    if not changes:
        return [*lines, "None: the run used `dinov2/configs/ssl_default_config.yaml` as it is."]
    lines += ["| key | default | this run |", "|---|---|---|"]
    lines += [f"| `{key}` | `{json.dumps(default)}` | `{json.dumps(value)}` |" for key, default, value in changes]
    return lines


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def evaluation_section(metrics: Mapping | None, source: str | None = None) -> list[str]:
    """The card's last section: the mean metrics per protocol of an ``eval_hier`` ``metrics.json``."""
    if metrics is None:
        return [
            EVALUATION_HEADING,
            "",
            "None yet: `python -m dinov2.eval.eval_hier --model model.pth --data MANIFEST --output-dir EVAL`, then "
            "`python -m dinov2.train.model_card MODEL_CARD.md --evaluation EVAL/metrics.json`.",
        ]
    run = metrics["run"]
    lines = [
        EVALUATION_HEADING,
        "",
        f"From `{source}`: model `{run['model']}` on `{run['data']}` ({run['n_samples']} samples, "
        f"{run['evaluation']}).",
        "",
        "| protocol | " + " | ".join(SUMMARY_METRICS.values()) + " |",
        "|---" * (len(SUMMARY_METRICS) + 1) + "|",
    ]
    for protocol, result in metrics["protocols"].items():
        cells = [_number(result["mean"].get(name)) for name in SUMMARY_METRICS]
        lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
    return lines


def write_model_card(
    folder: Path,
    cfg,
    progress: TrainingProgress,
    backbone: DinoVisionTransformer,
    written: Mapping[str, str],
    evaluation: Path | None = None,
) -> Path:
    """``folder/MODEL_CARD.md`` describing the exports just ``written`` (file name -> kind) and those
    with the default names already in ``folder`` (``model.pth``, ``backbone.pth``, ``backbone.safetensors``)."""
    folder = Path(folder)
    files = {name: kind for name, kind in KNOWN_FILES.items() if (folder / name).exists()} | dict(written)
    tree = get_tree(cfg.supervised.hierarchy)
    metrics = json.loads(Path(evaluation).read_text()) if evaluation else None
    sections = [
        [
            f"# Model card: dino_hier `{cfg.student.arch}`, step {progress.step}",
            "",
            f"Written by dino_hier on {date.today().isoformat()} from the run's config and checkpoint; "
            "regenerated by every export, so edits here are lost.",
        ],
        _files_section(files, arch_config(backbone)),
        _architecture_section(cfg, backbone, tree),
        _hierarchy_section(cfg, tree),
        _data_section(cfg, tree),
        _training_section(cfg, progress),
        _config_section(cfg),
        evaluation_section(metrics, str(evaluation) if evaluation else None),
    ]
    text = "\n\n".join("\n".join(lines) for lines in sections) + "\n"
    old = (folder / CARD_NAME).read_text() if (folder / CARD_NAME).is_file() else ""
    if metrics is None and old.split("\n", 1)[0] == sections[0][0] and EVALUATION_HEADING in old:
        # another export of the same step (e.g. --backbone-only after model.pth): keep its evaluation
        text = text[: text.index(EVALUATION_HEADING)] + old[old.index(EVALUATION_HEADING) :]
    with atomic_write(folder / CARD_NAME, "w") as out:
        out.write(text)
    return folder / CARD_NAME


def set_card_evaluation(card: Path, metrics_path: Path) -> Path:
    """Replace the evaluation section of an existing card with the summary of ``metrics_path``."""
    card, metrics_path = Path(card), Path(metrics_path)
    if not card.is_file() or EVALUATION_HEADING not in card.read_text():
        raise DataError(f"{card} is not a model card written by dino_hier (no '{EVALUATION_HEADING}' section)")
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path} does not exist; it is the metrics.json that eval_hier writes")
    try:
        metrics = json.loads(metrics_path.read_text())
        section = evaluation_section(metrics, str(metrics_path))
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{metrics_path} is not an eval_hier metrics.json: {error!r}") from error
    text = card.read_text()
    card.write_text(text[: text.index(EVALUATION_HEADING)] + "\n".join(section) + "\n")
    return card


def latest_evaluation(eval_dir: Path) -> Path | None:
    """The ``metrics.json`` of the newest periodic export that was evaluated (``eval_dir/step_*/``)."""
    found = sorted(Path(eval_dir).glob("step_*/metrics.json"))
    return found[-1] if found else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinov2.train.model_card", description=__doc__.splitlines()[0])
    parser.add_argument("card", type=Path, help="MODEL_CARD.md written by an export")
    parser.add_argument(
        "--evaluation", type=Path, required=True, help="metrics.json of a python -m dinov2.eval.eval_hier run"
    )
    args = parser.parse_args(argv)
    print(f"updated {set_card_evaluation(args.card, args.evaluation)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
