"""A rank's host memory at start: the start file memory-mapped (one copy per node, in the page cache),
the model built on its device (scripts/bench_start_memory.py measures both for a ViT-L start)."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from dinov2.config.custom_hier import get_tree
from dinov2.models.weights import read_checkpoint
from dinov2.train.train import build_model
from dinov2.utils.config import load_config
from dinov2.utils.precision import Precision

MAPS = Path("/proc/self/maps")


@pytest.mark.skipif(not MAPS.exists(), reason="needs /proc/self/maps (Linux)")
def test_a_zip_checkpoint_is_memory_mapped_and_a_legacy_one_still_loads(tmp_path):
    state = {"teacher": {"backbone.w": torch.arange(6.0)}}
    modern, legacy = tmp_path / "modern.pth", tmp_path / "legacy.pth"
    torch.save(state, modern)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    mapped = read_checkpoint(modern)
    assert str(modern) in MAPS.read_text()  # the file's pages are mapped, not copied
    assert torch.equal(mapped["teacher"]["backbone.w"], state["teacher"]["backbone.w"])
    assert torch.equal(read_checkpoint(legacy)["teacher"]["backbone.w"], state["teacher"]["backbone.w"])


def test_the_model_is_created_on_its_device(tmp_path, monkeypatch):
    """Every parameter is initialised where it lives: no host copy of the model on a GPU rank (the meta
    device stands in for the GPU)."""
    initialised = []
    original = torch.nn.init.trunc_normal_

    def recording(tensor, *args, **kwargs):
        initialised.append(tensor.device.type)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", recording)
    cfg = load_config("demo", tiny_overrides(tmp_path / "unused.csv"))
    tree, meta = get_tree(cfg.supervised.hierarchy), torch.device("meta")
    model, _ = build_model(cfg, tree, meta, 1, Precision("fp32", "test"), load_pretrained=False)
    assert initialised and set(initialised) == {"meta"}
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
