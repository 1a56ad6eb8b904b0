"""A training run over time: every exported model of a training output folder evaluated the same way.

The trainer exports the teacher every ``train.eval_period_iterations`` steps to
``OUT/eval/step_<step>/model.pth`` (:mod:`dinov2.train.periodic_export`) and, at the end,
``OUT/model.pth`` from the newest checkpoint (whose step its name ``checkpoint_<step>.pth``
gives). Each model is evaluated into its own subfolder of the evaluation's output folder
(``step_<step>``, ``final`` for model.pth); ``metrics_over_training.csv`` holds one row per model
and protocol, and ``metrics_over_training.png`` plots the headline metrics against the iteration.
"""

import re
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dinov2.errors import CheckpointError  # noqa: E402
from dinov2.eval.report import write_text_atomically  # noqa: E402
from dinov2.train.checkpointing import list_checkpoints  # noqa: E402
from dinov2.train.export import EXPORTS_DIR  # noqa: E402

EXPORT_FOLDER = re.compile(r"^step_(\d+)$")
PLOTTED = ("accuracy", "balanced_accuracy", "f1_weighted", "hierarchical_f1")


def run_models(run_dir: Path) -> list[tuple[int | None, str, Path]]:
    """``[(step, name, model file)]`` of a training output folder, oldest first; model.pth last, with the step
    of the newest checkpoint (None when no checkpoint is left)."""
    run_dir = Path(run_dir)
    found = []
    for folder in (run_dir / EXPORTS_DIR).glob("step_*"):
        match = EXPORT_FOLDER.match(folder.name)
        if match and (folder / "model.pth").is_file():
            found.append((int(match.group(1)), f"step_{int(match.group(1)):07d}", folder / "model.pth"))
    found.sort()
    final = run_dir / "model.pth"
    if final.is_file():
        checkpoints = list_checkpoints(run_dir)
        step = int(checkpoints[-1].stem.split("_")[-1]) if checkpoints else None
        found.append((step, "final", final))
    if not found:
        raise CheckpointError(
            f"{run_dir} is a folder without exported models ({EXPORTS_DIR}/step_*/model.pth or model.pth); give "
            "--model a model file, or a training output folder (set train.eval_period_iterations to export "
            "models while training)"
        )
    return found


def evaluate_training_run(run_dir: Path, out_dir: Path, evaluate: Callable[[str, Path], dict]) -> pd.DataFrame:
    """Call ``evaluate(model file, out_dir / name)`` for every model of :func:`run_models`; write and return the
    table of headline values (the test-set value, or the mean over folds) per step and protocol."""
    rows = []
    models = run_models(run_dir)
    for index, (step, name, path) in enumerate(models, start=1):
        print(f"[{index}/{len(models)}] {path} (step {step if step is not None else 'unknown'})")
        summary = evaluate(str(path), out_dir / name)
        for protocol, result in summary["protocols"].items():
            rows.append({"step": step, "model": name, "path": str(path), "protocol": protocol, **result["mean"]})
    table = pd.DataFrame(rows)
    write_text_atomically(out_dir / "metrics_over_training.csv", table.to_csv(index=False))
    plot_over_training(table, out_dir / "metrics_over_training.png")
    print(f"wrote {out_dir / 'metrics_over_training.csv'} and metrics_over_training.png")
    return table


def plot_over_training(table: pd.DataFrame, path: Path) -> None:
    """One panel per headline metric (those present), one line per protocol, against the iteration."""
    metrics = [m for m in PLOTTED if m in table.columns and table[m].notna().any()]
    known = table[table["step"].notna()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for protocol, rows in known.groupby("protocol", sort=False):
            ax.plot(rows["step"], rows[metric], marker="o", label=protocol)
        ax.set_xlabel("iteration")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
