"""Does fine-tuning keep what the start backbone knows? The recipe of compare_small.yaml with each part taken out.

    python scripts/finetune_ablation.py --weights dinov2_vits14.pth --data pbc.csv --output-dir out/ablation \\
        [--steps 64] [--variant NAME=key=value,key=value ...] [key=value ...]

Runs the trainer once per variant (one after another; a finished variant is not run again) from the
same start, data and seed, self-supervised only (the comparison's ssl arm), with the recipe's whole
schedule shrunk to ``--steps`` and ``train.eval_manifest`` = ``--data``: the teacher is evaluated at
the start, half way and at the end (logistic regression fitted on the manifest's train rows, scored
on its test rows). Prints and writes ``OUT/ablation.md``: per variant the start's accuracy, the
lowest and the last accuracy over the run, and whether the run ever fell below the start's 95 %
bootstrap interval. Default variants: the full recipe; each part taken out (k-means prototypes, head
warm-up, fine-tuning learning rate, layer-wise decay, slow teacher, frozen blocks); all of them
taken out (naive: the demo recipe's learning rate and teacher, random heads, nothing frozen); and
the naive setting with each part put back.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dinov2.utils.config import load_config

PARTS = {  # a part of the recipe -> the overrides that take it out (the demo recipe's values)
    "kmeans_heads": ["dino.head_init=random"],
    "head_warmup": ["optim.freeze_backbone_epochs=0"],
    "ft_lr": ["optim.base_lr=0.02"],
    "layer_decay": ["optim.layerwise_decay=1.0"],
    "slow_teacher": ["teacher.momentum_teacher=0.95", "teacher.final_momentum_teacher=0.995"],
    "frozen_blocks": ["student.freeze_blocks=0"],
}


def default_variants() -> dict:
    """The recipe; each part taken out; all taken out (naive); naive with each part put back."""
    variants = {"recipe": []}
    variants.update({f"without_{part}": removal for part, removal in PARTS.items()})
    variants["naive"] = [item for removal in PARTS.values() for item in removal]
    for part in PARTS:
        variants[f"naive_with_{part}"] = [item for other, removal in PARTS.items() if other != part for item in removal]
    return variants


METRIC = "eval/logreg/accuracy"


def parse_variants(specs) -> dict:
    if not specs:
        return default_variants()
    variants = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        variants[name] = [item for item in rest.split(",") if item]
    return variants


def curve(run_dir: Path) -> list:
    lines = (run_dir / "training_metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[METRIC], r.get(f"{METRIC}_low")) for r in map(json.loads, lines) if METRIC in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="start backbone (student.pretrained_weights)")
    parser.add_argument("--data", required=True, help="manifest with train and test rows: training data and probe")
    parser.add_argument("--output-dir", type=Path, required=True, help="one folder per variant, and ablation.md")
    parser.add_argument("--config-file", default="compare_small", help="the recipe (default compare_small)")
    parser.add_argument(
        "--steps",
        type=int,
        default=64,
        help="training steps per variant: the recipe's schedule (epochs) shrunk to this length (default 64)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=key=value,...",
        help="a variant as overrides of the recipe (repeatable; default: the recipe and each part removed)",
    )
    parser.add_argument("opts", nargs="*", metavar="key=value", help="overrides for every variant")
    args = parser.parse_args()
    epochs = load_config(args.config_file, args.opts).optim.epochs
    epoch_length = max(1, args.steps // epochs)  # the recipe's whole schedule, in miniature
    rows = []
    for name, overrides in parse_variants(args.variant).items():
        run_dir = args.output_dir / name
        if not (run_dir / "model.pth").is_file():
            command = [
                sys.executable,
                "-m",
                "dinov2.train.train",
                "--config-file",
                args.config_file,
                "--output-dir",
                str(run_dir),
                *args.opts,
                f"student.pretrained_weights={args.weights}",
                f"train.dataset_path_unsup=[{args.data}]",
                "supervised.loss_weight=0",  # the ssl arm: labels would hide what self-supervision does
                f"train.eval_manifest={args.data}",
                "train.eval_protocols=logreg",
                f"train.OFFICIAL_EPOCH_LENGTH={epoch_length}",
                f"train.eval_period_iterations={max(1, args.steps // 2)}",
                "train.keep_exports=1",
                *overrides,
            ]
            subprocess.run(command, check=True)
        points = curve(run_dir)
        start, start_low = points[0][1], points[0][2]
        lowest = min(value for _, value, _ in points)
        below = "—" if start_low is None else ("yes" if lowest < start_low else "no")
        changes = ", ".join(f"`{item}`" for item in overrides) or "(compare_small as is)"
        rows.append(f"| {name} | {changes} | {start:.3f} | {lowest:.3f} | {points[-1][1]:.3f} | {below} |")
    table = [
        f"Logistic-regression accuracy of the teacher on {args.data}'s test rows over {args.steps} steps:",
        "",
        "| variant | change to the recipe | start | lowest | end | below the start's 95 % interval |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(table) + "\n"
    (args.output_dir / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
