"""The torch floor (checked at import, stated in requirements.txt) and install metadata that cannot
replace a cluster's CUDA torch."""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

import dinov2
from dinov2 import TORCH_FLOOR, check_torch_version


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0a0+ecf3bae40a.nv25.01", "2.11.0+cu130", "2.14.1", "3.0.0"])
def test_torch_at_or_above_the_floor_passes(version):
    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.5.1+cu121", "2.4.0", "1.13.1"])
def test_an_older_torch_is_refused_naming_both_versions(version):
    with pytest.raises(ImportError, match=rf"torch >= 2\.6, found torch {re.escape(version)}.*fully_shard"):
        check_torch_version(version)


@pytest.mark.slow  # a fresh interpreter imports torch: seconds
def test_importing_dinov2_with_an_old_torch_fails_with_the_message():
    code = "import torch; torch.__version__ = '2.5.1+cu124'; import dinov2"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ImportError: dino_hier needs torch >= 2.6, found torch 2.5.1+cu124" in done.stderr


def _metadata(tmp_path) -> str:
    """requires.txt as setuptools writes it from setup.py (install_requires, then one [extra] per extra)."""
    for name in ("setup.py", "requirements.txt", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tmp_path)
    (tmp_path / "dinov2").mkdir()
    command = [sys.executable, "setup.py", "--quiet", "egg_info", "--egg-base", str(tmp_path)]
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    return (next(tmp_path.glob("*.egg-info")) / "requires.txt").read_text()


def test_requirements_state_the_floor_and_no_extra_can_replace_torch(tmp_path):
    requires = _metadata(tmp_path)
    base, _, extras = requires.partition("\n[")
    floor = ".".join(map(str, TORCH_FLOOR))
    assert re.search(rf"^torch>={re.escape(floor)}$", base, re.M), base  # no upper bound: keep the cluster's torch
    assert re.search(r"^torchvision>=[\d.]+$", base, re.M), base
    assert "xformers" not in requires and "torch" not in extras, requires
    assert dinov2.__version__
