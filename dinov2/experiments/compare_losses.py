"""The paper's claim as one command: HCE vs flat CE vs self-supervision alone, same start, same data.

    python -m dinov2.experiments.compare_losses --config-file compare_small \\
        --weights dinov2_vits14.pth --sup-data pbc.csv --eval-data pbc.csv external.csv \\
        --output-dir out/compare

Trains one run per arm (default ``ssl``: no supervised term, ``ce``, ``hce``) from the same config,
start weights, seed, data order and schedule (the arms differ in ``supervised.*`` keys alone,
checked), exports each, evaluates each with ``eval_hier`` on every evaluation set, and writes
OUT/comparison.{md,json,csv,png}: per evaluation set the arms' metrics with 95 % bootstrap intervals
and the paired differences (``hce - ce``, ``hce - ssl``) over the same resampled test images, and
in words what the data support and what they do not. An evaluation manifest with train and test
rows is scored on its test rows (classifiers fitted on its train rows); one without is scored by
stratified k-fold cross-validation (every image predicted once). A finished arm or evaluation is not
run again; rerun the same command after an interruption.
"""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from dinov2.config.custom_hier import get_tree
from dinov2.data.manifest import read_manifests, resolve_manifest_labels, write_manifest
from dinov2.errors import ConfigError, DataError
from dinov2.experiments.arms import DEFAULT_ARMS, arm_config, build_arms, config_differences
from dinov2.experiments.comparison import DEFAULT_METRICS, compare, default_pairs, parse_pairs
from dinov2.experiments.runner import ArmPlan, claim_folder, run_locally, run_on_cluster
from dinov2.run.submit import add_launcher_args
from dinov2.train.ssl_meta_arch import SUPERVISED_LOSSES
from dinov2.utils.cli import run_cli
from dinov2.utils.config import find_config_file

COARSE_LABELS = ("drop", "keep")
LEAF_LABEL_LOSSES = ("ce", "supcon")  # refuse labels at internal nodes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.experiments.compare_losses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config-file",
        default="compare_small",
        help="run YAML shared by every arm: a path or a packaged name (default compare_small: ViT-S/14 "
        "fine-tuning on the CPU)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="start weights of every arm (student.pretrained_weights): a file, URL or preset; default: the config's",
    )
    parser.add_argument(
        "--sup-data", nargs="+", required=True, help="labelled manifest CSV(s) of the supervised term (train rows)"
    )
    parser.add_argument(
        "--unsup-data",
        nargs="+",
        default=None,
        help="manifest CSV(s) of the self-supervised term (train rows; default: the --sup-data manifests)",
    )
    parser.add_argument(
        "--eval-data",
        nargs="+",
        required=True,
        metavar="[NAME=]CSV",
        help="evaluation manifests (held-out and external), each named by NAME or its file name; one with "
        "train and test rows is scored on its test rows, one without by stratified cross-validation (--folds)",
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="folder of the runs, evaluations and comparison")
    parser.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help="comma-separated arms (default ssl,ce,hce): ssl (no supervised term), a supervised.loss value "
        "(hce with the config's alpha, ce, ...), hce_alpha<value>, or NAME:key=value,key=value with "
        "supervised.* keys only",
    )
    parser.add_argument(
        "--alphas", type=float, nargs="*", default=(), help="more HCE arms, one per alpha (named hce_alpha<value>)"
    )
    parser.add_argument(
        "--pairs",
        default=None,
        help="comma-separated paired differences A-B (default: every arm other than ssl and ce against ce and "
        "ssl, e.g. hce-ce,hce-ssl)",
    )
    parser.add_argument(
        "--protocol",
        default="logreg",
        help="eval_hier protocol of the comparison (logreg, knn_k20, knn_k1; default logreg, the paper's)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples of the test images (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the bootstrap (default 0)")
    parser.add_argument(
        "--folds",
        type=int,
        default=5,
        help="cross-validation folds of an evaluation manifest without train/test rows (default 5)",
    )
    parser.add_argument(
        "--rare", default=None, help="comma-separated rare node names (default: labels under 2%% of the test images)"
    )
    parser.add_argument(
        "--coarse-labels",
        choices=COARSE_LABELS,
        default="drop",
        help="supervised rows labelled at an internal node (flat CE and SupCon cannot use them): drop (default) "
        "trains every arm on the leaf-labelled rows alone, so the arms differ in the loss only; keep gives them "
        "to the arms whose loss takes them (HCE, hier_supcon; the comparison says so)",
    )
    parser.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: the arms one after another on this machine (default); slurm: one submitit job per arm, "
        "side by side (resources below; --cluster local or debug run them here, for testing)",
    )
    parser.add_argument(
        "opts", nargs="*", metavar="key=value", help="config overrides for every arm, e.g. train.max_iters=100"
    )
    add_launcher_args(parser)
    return parser


def named_sets(specs: Sequence[str]) -> dict:
    """``{name: path}`` from ``[NAME=]CSV`` items; names must be unique."""
    sets = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not Path(path).is_file():
            raise DataError(f"--eval-data {spec}: no such manifest file")
        if name in sets:
            raise ConfigError(f"--eval-data: two sets are named {name!r}; name them, e.g. held_out={path}")
        sets[name] = Path(path).resolve()
    return sets


def leaf_labelled(paths: Sequence, hierarchy: str, out: Path) -> tuple[Path, int]:
    """A manifest of the rows of ``paths`` labelled at a leaf (flat CE's usable rows): ``(path, rows dropped)``."""
    frame = read_manifests([str(p) for p in paths])
    tree = get_tree(hierarchy)
    labels = resolve_manifest_labels(frame, tree)
    leaf = (labels >= 0) & (labels < len(tree.leaves))
    coarse = int((labels >= len(tree.leaves)).sum())
    write_manifest(frame[leaf], out)
    return out, coarse


def supervised_data(config_file, common, arms, losses: dict, sup: list, out: Path, coarse_labels: str):
    """``({arm: supervised manifests}, note or None)``: with an arm whose loss needs leaf labels and supervised
    rows labelled at internal nodes, those rows are left out for every arm (``drop``) or for that arm (``keep``)."""
    sup_for = {arm.name: sup for arm in arms}
    if not any(loss in LEAF_LABEL_LOSSES for loss in losses.values()):
        return sup_for, None
    hierarchy = arm_config(config_file, common, arms[0]).supervised.hierarchy
    leaf_manifest, n_coarse = leaf_labelled(sup, hierarchy, out / "data" / "supervised_leaf_labels.csv")
    if not n_coarse:
        return sup_for, None
    if coarse_labels == "drop":
        note = f"{n_coarse} supervised rows labelled at internal nodes were left out for every arm"
        return {arm.name: [str(leaf_manifest)] for arm in arms}, note
    for name, loss in losses.items():
        if loss in LEAF_LABEL_LOSSES:
            sup_for[name] = [str(leaf_manifest)]
    leaf_arms = ", ".join(name for name, loss in losses.items() if loss in LEAF_LABEL_LOSSES)
    return sup_for, f"{n_coarse} supervised rows labelled at internal nodes trained every arm but {leaf_arms}"


def evaluation_argv(model: Path, manifest: Path, folder: Path, protocols: str, args) -> list:
    frame = read_manifests([str(manifest)])
    splits = set(frame["split"])
    argv = ["--model", str(model), "--data", str(manifest), "--output-dir", str(folder), "--protocols", protocols]
    argv += ["--seed", str(args.seed)]
    argv += ["--split"] if {"train", "test"} <= splits else ["--folds", str(args.folds)]
    argv += ["--rare", args.rare] if args.rare else []
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    arms = build_arms(args.arms.split(","), args.alphas)
    eval_sets = named_sets(args.eval_data)
    pairs = parse_pairs(args.pairs, [arm.name for arm in arms]) if args.pairs else default_pairs(arms)
    config_file = str(find_config_file(args.config_file).resolve())

    common = list(args.opts)
    if args.weights:
        common.append(f"student.pretrained_weights={args.weights}")
    sup = [str(Path(p).resolve()) for p in args.sup_data]
    unsup = [str(Path(p).resolve()) for p in args.unsup_data or args.sup_data]
    common.append(f"train.dataset_path_unsup=[{','.join(unsup)}]")
    losses = {arm.name: arm_config(config_file, common, arm).supervised.loss for arm in arms if arm.supervised}
    unknown = sorted({loss for loss in losses.values() if loss not in SUPERVISED_LOSSES})
    if unknown:
        raise ConfigError(
            f"arm loss(es) {', '.join(unknown)} unknown; supervised.loss takes {', '.join(SUPERVISED_LOSSES)}"
        )
    sup_for, coarse_note = supervised_data(config_file, common, arms, losses, sup, out, args.coarse_labels)

    plans, configs = [], {}
    for arm in arms:
        arm_common = [*common, f"train.dataset_path_sup=[{','.join(sup_for[arm.name])}]"]
        cfg = arm_config(config_file, arm_common, arm)
        configs[arm.name] = cfg
        folder = out / "arms" / arm.name
        protocols = "knn,logreg" + (",head" if arm.supervised else "")
        evaluations = {
            name: (
                out / "eval" / arm.name / name,
                evaluation_argv(folder / "model.pth", path, out / "eval" / arm.name / name, protocols, args),
            )
            for name, path in eval_sets.items()
        }
        train_argv = ["--config-file", config_file, "--output-dir", str(folder), *arm_common, *arm.overrides]
        plans.append(ArmPlan(arm.name, folder, cfg, train_argv, evaluations))
    differences = config_differences(configs)
    outside = [key for key in differences if not key.startswith("supervised.") and key != "train.dataset_path_sup"]
    if outside:  # cannot happen through build_arms; a guard for the comparison's one promise
        raise ConfigError(f"the arms' configs differ outside the supervised loss: {', '.join(outside)}")
    for plan in plans:
        claim_folder(plan)
    (out / "arms.json").write_text(
        json.dumps(
            {
                "arms": {arm.name: list(arm.overrides) for arm in arms},
                "common_overrides": common,
                "config_file": config_file,
                "config_differences": differences,
                "coarse_labels": coarse_note,
            },
            indent=2,
            default=str,
        )
    )
    log = lambda message: print(message, flush=True)  # noqa: E731
    if args.launcher == "slurm":
        run_on_cluster(plans, args, out / "submitit", log)
    else:
        run_locally(plans, log)
    compare(
        out,
        plans,
        eval_sets,
        pairs,
        args.protocol,
        DEFAULT_METRICS,
        args.bootstrap,
        args.seed,
        args.rare,
        notes=[coarse_note] if coarse_note else [],
    )
    log(f"wrote {out / 'comparison.md'} (and .json, .csv, .png)")
    return 0


if __name__ == "__main__":
    run_cli(main)
