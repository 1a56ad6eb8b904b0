"""Exports during training (every ``train.eval_period_iterations`` steps).

Each writes ``OUT/eval/step_<step:07d>/model.pth`` with its ``MODEL_CARD.md``. Only the teacher
backbone and the supervised head are gathered (a collective under FSDP, the unsharded tensors on
rank 0 alone), not the student, the DINO/iBOT heads or the optimizer: for the paper's ViT-L/14
with its 65536-prototype heads, 1.21 GB instead of the 2.94 GB of the model's state. Only the
newest ``train.keep_exports`` folders are kept (0 keeps all). With ``train.eval_manifest`` set,
rank 0 evaluates each export on it with ``eval_hier`` (``train.eval_protocols``, by default k-NN
and the supervised head, fitted on the manifest's train rows, scored on its test rows; keep the
manifest small, the other ranks wait) and returns the mean metrics as a record for the training
curves (``eval/<protocol>/<metric>``). With an evaluation manifest the trainer also exports and
evaluates the start (step 0) and the last step: the curve's first and last points.
"""

import json
import logging
import shutil
from pathlib import Path

from dinov2 import distributed
from dinov2.errors import UserError
from dinov2.eval import eval_hier
from dinov2.fsdp import full_model_state_dict
from dinov2.train.export import EXPORTS_DIR, export_model
from dinov2.train.model_card import CARD_NAME, SUMMARY_METRICS, TrainingProgress, set_card_evaluation
from dinov2.train.ssl_meta_arch import supervised_term_on

logger = logging.getLogger("dinov2")


def export_folder(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / EXPORTS_DIR / f"step_{step:07d}"


def prune_exports(output_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` export folders (``keep`` 0: none); returns the removed ones."""
    folders = sorted((Path(output_dir) / EXPORTS_DIR).glob("step_*"))
    removed = folders[:-keep] if keep > 0 else []
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def evaluation_record(step: int, metrics: dict) -> dict:
    """``{"step": step, "eval/<protocol>/<metric>": mean}`` from an eval_hier ``metrics.json``, with
    ``.../<metric>_low`` and ``_high``, the bounds of its bootstrap interval, where it has one."""
    record = {"step": step}
    for protocol, result in metrics["protocols"].items():
        for name in SUMMARY_METRICS:
            if result["mean"].get(name) is not None:
                record[f"eval/{protocol}/{name}"] = result["mean"][name]
                interval = result.get("interval", {}).get(name)
                if interval is not None:
                    record[f"eval/{protocol}/{name}_low"] = interval["low"]
                    record[f"eval/{protocol}/{name}_high"] = interval["high"]
    return record


def evaluation_protocols(cfg) -> str:
    """``train.eval_protocols`` without ``head`` when the run exports no head (``supervised.loss_weight``
    0: a self-supervised run); k-NN when nothing else was asked for."""
    protocols = [p.strip() for p in str(cfg.train.eval_protocols).split(",") if p.strip()]
    if not supervised_term_on(cfg):
        protocols = [p for p in protocols if p != "head"] or ["knn"]
    return ",".join(protocols)


def export_for_evaluation(
    model, cfg, output_dir: Path, step: int, world_size: int, precision: dict | None = None
) -> dict | None:
    """The periodic export (collective: call on every rank); on rank 0 with ``train.eval_manifest`` set,
    the evaluation record, else None. ``precision``: the run's record (``{"name", "reason"}``)."""
    backbone_state = full_model_state_dict(model.teacher.backbone)
    head_state = full_model_state_dict(model.supervised_head)
    if not distributed.is_main_process():
        return None
    state = {f"teacher.backbone.{key}": value for key, value in backbone_state.items()}
    state.update({f"supervised_head.{key}": value for key, value in head_state.items()})
    folder = export_folder(output_dir, step)
    path = export_model(state, cfg, folder / "model.pth", TrainingProgress(step, world_size, precision))
    removed = prune_exports(output_dir, cfg.train.keep_exports)
    logger.info("teacher exported for evaluation: %s%s", path, f" (removed {len(removed)} older)" if removed else "")
    if not cfg.train.eval_manifest:
        return None
    arguments = ["--model", str(path), "--data", str(cfg.train.eval_manifest), "--output-dir", str(folder)]
    try:
        eval_hier.main([*arguments, "--split", "--protocols", evaluation_protocols(cfg), "--embedding", "pca"])
    except UserError as error:  # a failed evaluation must not end a long run; the export is written
        logger.warning("evaluation of %s on train.eval_manifest failed, training goes on: %s", path, error)
        return None
    set_card_evaluation(folder / CARD_NAME, folder / "metrics.json")
    record = evaluation_record(step, json.loads((folder / "metrics.json").read_text()))
    accuracies = [f"{key.split('/')[1]} {value:.3f}" for key, value in record.items() if key.endswith("/accuracy")]
    logger.info("evaluation of step %d on %s: accuracy %s", step, cfg.train.eval_manifest, ", ".join(accuracies))
    return record
