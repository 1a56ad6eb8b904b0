"""The benchmark scripts run end to end (tiny settings) and print the ratios they promise."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*:?\s*([0-9.]+)", text)
    assert match, f"{label!r} not in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("heads", ["default", "paper"])
def test_bench_train_prints_the_rate_ratio_and_mfu(heads):
    out = run_script(
        "bench_train.py",
        "--arch",
        "vit_test",
        "--batch",
        "2",
        "--prototypes",
        "64",
        "--heads",
        heads,
        "--repeats",
        "1",
        "--warmup",
        "1",
    )
    assert f"({heads} heads)" in out and re.search(r"precision (fp32|bf16) \(auto: ", out), out
    assert 0 < number_after("full / backbone-only rate", out) < 10
    assert number_after("the same from the median times", out) > 0
    for line in ("full step", "backbone only"):
        mfu = re.search(line + r".*MFU ([0-9.]+)%", out)
        assert mfu and 0 < float(mfu.group(1)) < 100, out


def test_bench_train_times_the_step_with_frozen_blocks():
    args = ("--arch", "vit_test", "--batch", "2", "--prototypes", "64", "--repeats", "1", "--warmup", "1")
    out = run_script("bench_train.py", *args, "--freeze-blocks", "1")
    line = re.search(r"1 blocks frozen: [0-9.]+ s/step \(x([0-9.]+) .* state for ([0-9.]+) M of ([0-9.]+) M", out)
    assert line, out
    assert float(line.group(1)) > 0 and float(line.group(2)) < float(line.group(3))


def json_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_bench_backbone_prints_rates_of_both_models():
    out = run_script("bench_backbone.py", "--arch", "vit_test", "--batch-size", "2", "--iters", "1", "--warmup", "0")
    rows = json_lines(out)
    precisions = ("fp32", "bf16") if "precision auto: bf16" in out else ("fp32",)  # bf16 only where it is fast
    assert {(r["model"], r["pass"], r["precision"]) for r in rows} == {
        (m, p, q) for m in ("ours", "dinov2") for p in ("fwd", "fwd+bwd") for q in precisions
    }
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)


def test_bench_hce_prints_the_speedup_over_the_naive_loss():
    out = run_script("bench_hce.py", "--batch-sizes", "8", "--repeats", "1", "--big-leaves", "50")
    rows = json_lines(out)
    assert [r["tree"] for r in rows] == ["v1", "generated_50"]
    assert all(r["hce_ms"] > 0 and r["naive_vs_hce"] > 0 for r in rows)


def test_bench_augment_runs_on_a_given_jpeg(tmp_path):
    image = tmp_path / "cell.jpg"
    Image.new("RGB", (120, 110), (200, 120, 160)).save(image)
    out = run_script("bench_augment.py", "--image", str(image), "--rounds", "1", "--images-per-round", "2")
    rates = [float(x) for x in re.findall(r"([0-9.]+) images/s/core", out)]
    assert len(rates) == 3 and all(r > 0 for r in rates), out


def test_bench_eval_runs_the_protocols_and_the_extraction():
    out = run_script(
        "bench_eval.py",
        "--samples",
        "200",
        "--dim",
        "16",
        "--folds",
        "2",
        "--arch",
        "vit_test",
        "--image-size",
        "56",
        "--n-images",
        "4",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--resamples",
        "50",
        "--precision",
        "fp32",
    )
    protocols, bootstrap, extraction = json_lines(out)
    assert set(protocols["balanced_accuracy"]) == {"knn_k1", "knn_k20", "logreg"}
    assert bootstrap["resamples"] == 50 and set(bootstrap["balanced_accuracy_interval"]) == set(
        protocols["balanced_accuracy"]
    )
    assert extraction["precision"] == "fp32" and extraction["images_per_s"]["extract"] > 0
    assert extraction["extract_over_forward_fp32"] > 0


@pytest.mark.slow
def test_bench_tricks_compares_each_trick_with_its_plain_version():
    out = run_script(
        "bench_tricks.py",
        *("--paths", "demo", "augment", "--precision", "fp32", "--repeats", "1", "--warmup", "0"),
        *("--mallopt-repeats", "1", "--child-steps", "1"),
    )
    rows = json_lines(out)
    assert {(r["path"], r["trick"]) for r in rows} == {
        ("demo", "attention"),
        ("demo", "mallopt"),
        ("augment", "hue_table"),
        ("augment", "blur_taps"),
    }
    assert all(r["trick_s"] > 0 and r["plain_s"] > 0 and r["precision"] == "fp32" for r in rows)
