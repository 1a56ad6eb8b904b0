"""The CPU demo behind ``make demo``: generate data, train a tiny model, export it, evaluate it.

    python -m dinov2.demo --output-dir demo_output

1. ``OUT/data``: generated WBC-like cells, labelled at leaves (``demo_fine``) and at internal
   nodes only (``demo_coarse``), with train/val/test splits (:mod:`dinov2.data.synthetic_cells`);
2. ``OUT/train``: ``dinov2/configs/train/demo.yaml`` (DINO + iBOT + HCE on a small ViT) on the train split;
3. ``OUT/train/model.pth``: teacher backbone + supervised head + tree, with ``MODEL_CARD.md`` beside it;
4. ``OUT/eval``: k-NN, logistic regression and the supervised head, fitted on the train rows and
   scored on the held-out test rows, with flat and hierarchical metrics, a report and plots (their
   summary goes into the model card).
"""

import argparse
import time
from pathlib import Path

from dinov2.data.synthetic_cells import generate_demo_dataset
from dinov2.eval import eval_hier
from dinov2.train import train
from dinov2.train.model_card import CARD_NAME, set_card_evaluation
from dinov2.utils.cli import run_cli
from dinov2.utils.config import CONFIGS_DIR


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinov2.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("demo_output"),
        help="folder for data, training run and evaluation (default: demo_output)",
    )
    parser.add_argument("--n-per-class", type=int, default=24, help="generated images per class (default: 24)")
    parser.add_argument("--size", type=int, default=112, help="generated image side in pixels (default: 112)")
    parser.add_argument(
        "--config-file",
        type=Path,
        default=CONFIGS_DIR / "train" / "demo.yaml",
        help="training config (default: dinov2/configs/train/demo.yaml)",
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="retrain from scratch even if OUTPUT_DIR/train holds checkpoints"
    )
    parser.add_argument(
        "opts", nargs="*", metavar="key=value", help="extra training config overrides, e.g. optim.epochs=2"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = args.output_dir

    manifest = out / "data" / "manifest.csv"
    if manifest.exists():
        print(f"[1/4] demo data: reusing {manifest}")
    else:
        print(f"[1/4] demo data: generating {args.n_per_class} images per class into {out / 'data'}")
        manifest = generate_demo_dataset(out / "data", n_per_class=args.n_per_class, size=args.size, progress=True)

    train_dir = out / "train"
    print(f"[2/4] training {args.config_file} into {train_dir} (CPU; progress bar with ETA below)")
    train_args = ["--config-file", str(args.config_file), "--output-dir", str(train_dir)]
    train_args += ["--no-resume"] if args.no_resume else []
    code = train.main([*train_args, f"train.dataset_path_unsup=[{manifest}]", *args.opts])
    if code:
        return code
    model_file = train_dir / "model.pth"
    print(f"[3/4] exported model: {model_file}")

    eval_dir = out / "eval"
    print(f"[4/4] evaluating on the held-out test split into {eval_dir}")
    # PCA: UMAP's first fit in a process compiles for 10-30 s, longer than the demo's evaluation
    eval_args = ["--model", str(model_file), "--data", str(manifest), "--output-dir", str(eval_dir), "--split"]
    code = eval_hier.main([*eval_args, "--embedding", "pca"])
    if code:
        return code
    card = set_card_evaluation(train_dir / CARD_NAME, eval_dir / "metrics.json")
    print(f"report: {eval_dir / 'report.md'}; model card: {card}")
    print(f"plots:  {', '.join(str(p) for p in sorted(eval_dir.glob('*.png')))}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; training log {train_dir / 'log.txt'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
