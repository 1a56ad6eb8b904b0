"""The comparison of the arms: tables with bootstrap intervals, paired differences, a plot and a verdict in words.

Everything is computed from the arms' ``eval_hier`` ``predictions.csv`` of one protocol, so every
number can be recomputed. Per evaluation set:

* each arm's metrics with a percentile bootstrap interval over the test images
  (:func:`dinov2.eval.bootstrap.bootstrap_intervals`);
* per pair ``A-B`` the paired difference ``metric(A) - metric(B)`` on the same resampled images
  (:func:`dinov2.eval.bootstrap.paired_bootstrap`): the resamples are the same for every arm (same
  seed, same number of images), so the interval of a difference is narrower than the arms'
  intervals suggest;
* a verdict per pair and metric: *A better* when the interval of the difference lies on the better
  side of 0 (above for every metric but mistake severity, where lower is better), *B better* when it
  lies on the other side, else *not resolved* (the interval holds 0).

What the intervals cover: the sampling of test images only. Every arm is one training run from one
seed; run-to-run variation of training is not in them (train more seeds to see it).
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dinov2.config.custom_hier import get_tree  # noqa: E402
from dinov2.errors import ConfigError, DataError  # noqa: E402
from dinov2.eval.bootstrap import bootstrap_intervals, paired_bootstrap  # noqa: E402
from dinov2.eval.compare import paired_table, read_predictions  # noqa: E402
from dinov2.eval.metrics import metric_functions  # noqa: E402
from dinov2.experiments.arms import SSL  # noqa: E402
from dinov2.experiments.runner import TIMING  # noqa: E402

DEFAULT_METRICS = (
    "balanced_accuracy",
    "f1_weighted",
    "mistake_severity",
    "hierarchical_f1",
    "rare_balanced_accuracy",
)
LOWER_IS_BETTER = {"mistake_severity"}
LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "f1_weighted": "weighted F1",
    "mistake_severity": "mistake severity",
    "hierarchical_f1": "hierarchical F1",
    "rare_balanced_accuracy": "rare-class balanced accuracy",
    "accuracy": "accuracy",
}
BASELINES = ("ce", SSL)
CONFIDENCE = 0.95
VERDICTS = ("A", "B", "unresolved", "undefined")
CLAIMED_GAIN = 0.01  # the paper: HCE about +1 pp balanced accuracy over flat CE on external blood data


def default_pairs(arms) -> list:
    """Every arm other than the baselines (ce, ssl) against each baseline present: hce-ce, hce-ssl, ..."""
    names = [arm.name for arm in arms]
    return [(a, b) for a in names if a not in BASELINES for b in BASELINES if b in names]


def parse_pairs(text: str, names) -> list:
    """``"hce-ce,hce-ssl"`` -> ``[("hce", "ce"), ("hce", "ssl")]``; ConfigError naming an unknown arm."""
    pairs = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        found = [(a, b) for a in names for b in names if a != b and f"{a}-{b}" == item]
        if len(found) != 1:
            raise ConfigError(f"--pairs {item!r}: write A-B with two arms of this comparison ({', '.join(names)})")
        pairs.append(found[0])
    return pairs


def verdict(metric: str, low: float, high: float) -> str:
    """``"A"`` (the first arm is better), ``"B"`` or ``"unresolved"`` from the difference's interval."""
    if math.isnan(low) or math.isnan(high):
        return "undefined"
    better_low, better_high = (-high, -low) if metric in LOWER_IS_BETTER else (low, high)
    if better_low > 0:
        return "A"
    if better_high < 0:
        return "B"
    return "unresolved"


def _node_indices(names, tree) -> np.ndarray:
    return np.array([tree.index(name) for name in names], dtype=np.int64)


def compare_set(folders: dict, pairs, protocol: str, metrics, n: int, seed: int, tree, rare_names) -> dict:
    """One evaluation set: ``{"n_images", "arms": {arm: {metric: {value, low, high}}}, "pairs": {"A-B":
    {metric: {a, b, difference, low, high, verdict}}}}`` from the arms' eval folders ``{arm: folder}``."""
    tables = {arm: read_predictions(folder) for arm, folder in folders.items()}
    for arm, table in tables.items():
        if protocol not in set(table["protocol"]):
            raise DataError(f"{folders[arm]} has no predictions of protocol {protocol!r} (--protocol)")
    rare = [tree.index(name) for name in rare_names]
    functions = {name: fn for name, fn in metric_functions(tree, rare).items() if name in metrics}
    first = next(iter(tables))
    reference = tables[first][tables[first]["protocol"] == protocol].sort_values("path")
    y_true = _node_indices(reference["label_node"], tree)
    result = {"n_images": int(y_true.size), "rare_classes": list(rare_names), "arms": {}, "pairs": {}}
    for arm, table in tables.items():
        joined = paired_table(table, tables[first], protocol, folders[first]).sort_index()
        result["arms"][arm] = bootstrap_intervals(
            y_true, _node_indices(joined["predicted_node"], tree), functions, tree, n=n, seed=seed
        )
    for a, b in pairs:
        joined = paired_table(tables[a], tables[b], protocol, folders[b]).sort_index()
        difference = paired_bootstrap(
            _node_indices(joined["label_node"], tree),
            _node_indices(joined["predicted_node"], tree),
            _node_indices(joined["predicted_node_other"], tree),
            functions,
            tree,
            n=n,
            seed=seed,
        )
        for name, entry in difference.items():
            entry["verdict"] = verdict(name, entry["low"], entry["high"])
        result["pairs"][f"{a}-{b}"] = difference
    return result


def _fmt(value: float, percent: bool, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    number = 100 * value if percent else value
    digits = 1 if percent else 3
    return f"{number:+.{digits}f}" if signed else f"{number:.{digits}f}"


def _interval(entry: dict, key: str, percent: bool, signed: bool = False) -> str:
    if math.isnan(entry[key]):
        return "—"
    low, high = _fmt(entry["low"], percent, signed), _fmt(entry["high"], percent, signed)
    return f"{_fmt(entry[key], percent, signed)} [{low}, {high}]"


def _percent(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def _difference(metric: str, entry: dict) -> str:
    unit = " pp" if _percent(metric) else ""
    return f"{LABELS.get(metric, metric)} {_interval(entry, 'difference', _percent(metric), signed=True)}{unit}"


def pair_verdict(pair: str, differences: dict) -> list:
    """Lines in words: the metrics on which ``A`` or ``B`` is better (the interval excludes 0), those
    not resolved (the interval holds 0: a difference that small could hide in it), those undefined."""
    a, b = pair.split("-", 1)
    by_verdict = {kind: [m for m, e in differences.items() if e["verdict"] == kind] for kind in VERDICTS}
    lines = [f"*{a} − {b}*"]
    for kind, winner, loser in (("A", a, b), ("B", b, a)):
        if by_verdict[kind]:
            listed = "; ".join(_difference(m, differences[m]) for m in by_verdict[kind])
            lines.append(f"- **{winner} better than {loser}**, the interval excludes 0: {listed}.")
    if by_verdict["unresolved"]:
        listed = "; ".join(_difference(m, differences[m]) for m in by_verdict["unresolved"])
        lines.append(f"- not resolved, the interval holds 0: {listed}.")
    if by_verdict["undefined"]:
        names = ", ".join(LABELS.get(m, m) for m in by_verdict["undefined"])
        lines.append(f"- undefined on this set: {names} (no rare class among its test images).")
    return lines


def claim_check(name: str, data: dict) -> list:
    """The paper's headline (HCE about +1 pp balanced accuracy over flat CE) against this set's
    ``hce - ce`` interval, in one line (none without that pair)."""
    entry = data["pairs"].get("hce-ce", {}).get("balanced_accuracy")
    if entry is None or math.isnan(entry["low"]):
        return []
    claimed = f"+{100 * CLAIMED_GAIN:.0f} pp"
    if entry["low"] > 0:
        finding = "HCE is better than flat CE here, as the paper reports"
    elif entry["high"] < 0:
        finding = "flat CE is better than HCE here, against the paper's report"
    elif entry["high"] < CLAIMED_GAIN:
        finding = f"no difference resolved, and a gain as large as the paper's {claimed} lies above the interval"
    else:
        width = 100 * (entry["high"] - entry["low"])
        finding = f"no difference resolved; the interval is {width:.1f} pp wide, too wide to show or rule out {claimed}"
    return [f"- {name}: hce − ce balanced accuracy {_interval(entry, 'difference', True, signed=True)} pp: {finding}."]


def render_markdown(result: dict) -> str:
    lines = [
        "# Loss comparison",
        "",
        f"Protocol `{result['protocol']}` (eval_hier) on the teacher backbone of each arm; "
        f"{result['resamples']} bootstrap resamples of the test images, {int(100 * CONFIDENCE)} % percentile "
        f"intervals, seed {result['seed']}. "
        "Percentages for every metric but mistake severity (mean tree distance of the mistakes; lower is better).",
        "",
        "Arms (each one training run from the same start, seed, data order and schedule; they differ in these "
        "config keys only):",
        "",
    ]
    for key, values in result["config_differences"].items():
        lines.append(f"- `{key}`: " + ", ".join(f"{arm} = `{value}`" for arm, value in values.items()))
    lines += [f"- {note}" for note in result["notes"]]
    summary = [line for name, data in result["sets"].items() for line in claim_check(name, data)]
    if summary:
        lines += ["", "## In short", "", *summary]
    for name, data in result["sets"].items():
        metrics = list(next(iter(data["arms"].values())))
        lines += ["", f"## {name} ({data['n_images']} test images, {data['design']})", ""]
        lines.append("| arm | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for arm, values in data["arms"].items():
            cells = [_interval(values[m], "value", _percent(m)) for m in metrics]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        if data["pairs"]:
            lines += ["", "Paired differences (A − B on the same resampled images):", ""]
            lines.append("| pair | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |")
            lines.append("|---|" + "---|" * len(metrics))
            for pair, values in data["pairs"].items():
                cells = [_interval(values[m], "difference", _percent(m), signed=True) for m in metrics]
                lines.append(f"| {pair} | " + " | ".join(cells) + " |")
            lines += ["", "What these data support:", ""]
            for pair, values in data["pairs"].items():
                lines += [*pair_verdict(pair, values), ""]
        if not data["rare_classes"]:
            lines.append("No label is rare here (under 2 % of the test images), so the rare-class metric is undefined.")
    timed = {arm: timing for arm, timing in result["timing"].items() if timing}
    if timed:
        lines += [
            "",
            "## Time (this machine, the last run of each part)",
            "",
            "| arm | part | wall | CPU |",
            "|---|---|---|---|",
        ]
        for arm, timing in timed.items():
            for part, spent in timing.items():
                lines.append(f"| {arm} | {part} | {spent['wall_s'] / 60:.1f} min | {spent['cpu_s'] / 60:.1f} min |")
    lines += [
        "",
        "## What these numbers do not say",
        "",
        "- The intervals cover the sampling of test images only. Each arm is one training run from one seed: "
        "how much a rerun with another `train.seed` moves the metrics is not in them, and for short fine-tuning "
        "runs it can be as large as the differences between losses. Train several seeds before claiming an effect.",
        "- A verdict holds for this start, these data, this schedule and this protocol; the paper's claim "
        "(about +1 pp balanced accuracy on external blood data, +2.5 pp out of domain, fewer severe mistakes) "
        "was measured on other data at another scale.",
        "- An effect smaller than the half-width of a 'not resolved' interval can neither be shown nor ruled "
        "out here; more test images narrow the intervals (roughly as 1/sqrt(n)).",
        "",
    ]
    return "\n".join(lines)


def write_table(result: dict, path: Path) -> None:
    rows = []
    for name, data in result["sets"].items():
        for arm, values in data["arms"].items():
            for metric, entry in values.items():
                rows.append(
                    {"set": name, "arm": arm, "metric": metric, **{k: entry[k] for k in ("value", "low", "high")}}
                )
        for pair, values in data["pairs"].items():
            for metric, entry in values.items():
                rows.append(
                    {
                        "set": name,
                        "arm": pair,
                        "metric": metric,
                        "value": entry["difference"],
                        "low": entry["low"],
                        "high": entry["high"],
                        "verdict": entry["verdict"],
                    }
                )
    pd.DataFrame(rows).to_csv(path, index=False)


def plot(result: dict, path: Path) -> None:
    """Per evaluation set: the arms' metrics with intervals (left), the paired differences (right)."""
    sets = result["sets"]
    fig, axes = plt.subplots(len(sets), 2, figsize=(13, 3.6 * len(sets)), squeeze=False)
    for row, (name, data) in enumerate(sets.items()):
        metrics = [m for m in next(iter(data["arms"].values())) if m not in LOWER_IS_BETTER]
        left, right = axes[row]
        width = 0.8 / max(1, len(data["arms"]))
        for i, (arm, values) in enumerate(data["arms"].items()):
            x = np.arange(len(metrics)) + (i - (len(data["arms"]) - 1) / 2) * width
            y = np.array([values[m]["value"] for m in metrics])
            err = np.array(
                [[values[m]["value"] - values[m]["low"], values[m]["high"] - values[m]["value"]] for m in metrics]
            ).T
            left.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=arm)
        left.set_xticks(np.arange(len(metrics)), [LABELS.get(m, m) for m in metrics], rotation=15, fontsize=8)
        left.set_title(f"{name}: arms (95 % intervals)", fontsize=10)
        left.legend(fontsize=8)
        labels, centres, lows, highs = [], [], [], []
        for pair, values in data["pairs"].items():
            for metric, entry in values.items():
                sign = -1 if metric in LOWER_IS_BETTER else 1  # plotted as "better for A" for every metric
                labels.append(f"{pair}: {LABELS.get(metric, metric)}" + (" (−)" if sign < 0 else ""))
                low, high = sorted((sign * entry["low"], sign * entry["high"]))
                centres.append(sign * entry["difference"])
                lows.append(low)
                highs.append(high)
        y = np.arange(len(labels))[::-1]
        centres, lows, highs = map(np.array, (centres, lows, highs))
        right.errorbar(centres, y, xerr=[centres - lows, highs - centres], fmt="o", capsize=3)
        right.axvline(0, color="grey", lw=1)
        right.set_yticks(y, labels, fontsize=7)
        right.set_title(f"{name}: paired differences, > 0 = first arm better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing_of(plan) -> dict:
    """The arm's ``timing.json`` (wall and CPU seconds of training and evaluation; {} when absent)."""
    path = plan.folder / TIMING
    return json.loads(path.read_text()) if path.is_file() else {}


def compare(out: Path, plans, eval_sets: dict, pairs, protocol, metrics, n: int, seed: int, rare, notes=()) -> dict:
    """Write ``OUT/comparison.{json,csv,md,png}`` from the arms' evaluations; returns the result."""
    tree = get_tree(plans[0].config.supervised.hierarchy)
    arms_json = json.loads((out / "arms.json").read_text())
    result = {
        "protocol": protocol,
        "resamples": n,
        "seed": seed,
        "confidence": CONFIDENCE,
        "config_differences": arms_json["config_differences"],
        "notes": list(notes),
        "timing": {plan.name: timing_of(plan) for plan in plans},
        "sets": {},
    }
    for name in eval_sets:
        folders = {plan.name: plan.evaluations[name][0] for plan in plans}
        first = json.loads((next(iter(folders.values())) / "metrics.json").read_text())
        rare_names = (
            first.get("rare_classes", []) if rare is None else [r.strip() for r in rare.split(",") if r.strip()]
        )
        data = compare_set(folders, pairs, protocol, metrics, n, seed, tree, rare_names)
        data["design"] = first["run"].get("evaluation", "")
        result["sets"][name] = data
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    write_table(result, out / "comparison.csv")
    (out / "comparison.md").write_text(render_markdown(result))
    plot(result, out / "comparison.png")
    return result
