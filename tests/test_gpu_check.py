"""scripts/gpu_check.py in its CPU miniature: every section runs the code paths that the GPU check runs
(the real SSLMetaArch step, parity, torchrun + FSDP2 trainer with a checkpoint, export and resume,
eval_hier and feature extraction), so that the script is ready when a GPU is at hand."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
@pytest.mark.distributed
def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    command = [sys.executable, "scripts/gpu_check.py", "--cpu-smoke", "--work-dir", str(tmp_path), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert done.returncode == 0, json.dumps(records, indent=1)[-6000:] + done.stderr[-3000:]
    assert [json.loads(line) for line in done.stdout.splitlines()] == records  # the same lines on stdout
    by_section = {}
    for record in records:
        by_section.setdefault(record["section"], []).append(record)
    assert list(by_section) == ["environment", "parity", "step", "train", "eval", "summary"]
    assert all(record["ok"] for record in records)
    loss_parity = by_section["parity"][0]
    assert set(loss_parity["on_device"]) == {
        "dino_global",
        "dino_local",
        "ibot",
        "koleo",
        "supervised",
        "supervised_head",
    }
    (step,) = by_section["step"]
    assert step["loss_device"] == "cpu" and step["ms_per_step"] > 0 and step["mfu_measured_peak"] >= 0
    first, resumed = by_section["train"]
    assert first["checkpoints"] == ["checkpoint_0000004.pth", "checkpoint_0000006.pth"]
    assert [export.split("/")[0] for export in first["exports"]] == ["step_0000004"]  # the export at 4
    assert resumed["resumed_from_step"] == 6 and resumed["steps_logged"][-1] == 8
    extraction = by_section["eval"][1]
    assert extraction["cosine_device_bf16_vs_cpu_fp32_min"] > 0.99 and extraction["backbone_images_per_s"] > 0
