"""MODEL_CARD.md: written from the run's config, manifests and checkpoint; the evaluation section is replaceable."""

import json

import pytest
from conftest import make_demo_data, tiny_overrides

from dinov2.config.custom_hier import get_tree
from dinov2.data.manifest import read_manifests, resolve_manifest_labels
from dinov2.errors import DataError
from dinov2.models import build_backbone
from dinov2.train import model_card
from dinov2.train.model_card import (
    MODEL_FILE,
    TrainingProgress,
    config_changes,
    set_card_evaluation,
    write_model_card,
)
from dinov2.train.ssl_meta_arch import backbone_kwargs
from dinov2.utils.config import load_config

METRICS = {
    "run": {"model": "model.pth", "data": "test.csv", "n_samples": 40, "evaluation": "train/test split"},
    "protocols": {
        "knn_k20": {"mean": {"accuracy": 0.8125, "balanced_accuracy": 0.75, "f1_macro": None, "mistake_severity": 1.5}},
        "head": {"mean": {"accuracy": 0.9, "balanced_accuracy": 0.85, "hierarchical_f1": 0.95}},
    },
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("data"))


def _card(tmp_path, manifest, step=5, **extra):
    cfg = load_config(None, tiny_overrides(manifest, **{"train.max_iters": 7, **extra}))
    backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, 0.0))
    progress = TrainingProgress(step, 2, {"name": "fp32", "reason": "asked for"})
    path = write_model_card(tmp_path / "out", cfg, progress, backbone, {"model.pth": MODEL_FILE})
    return cfg, path.read_text()


def _row(text: str, first_cell: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_card_states_what_the_run_knows(tmp_path, manifest):
    cfg, text = _card(tmp_path, manifest)
    assert text.startswith("# Model card: dino_hier `vit_test`, step 5")
    assert "| `model.pth` | dino_hier model file" in text
    snippet = '"vit_small_patch14_dinov2", pretrained=True, pretrained_cfg_overlay={"file": "backbone.safetensors"},'
    assert f"    {snippet}\n" in text
    assert "    embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)" in text
    assert "embed dim 32, depth 2, 2 heads, patch 8, 0 register tokens" in text
    assert "- start weights: random initialisation" in text
    assert "- steps: 5 of 7 (train.max_iters" in text and "- global batch: 8 (4 per process × 2 processes)" in text
    assert "- precision: fp32 (`compute_precision.dtype=fp32`; asked for)" in text
    tree = get_tree("v1")
    for index, leaf in enumerate(tree.leaves):  # the hierarchy with every leaf and its head row
        assert f"- {leaf} — leaf {index}\n" in text
    # image counts per node and data set, as the manifest says (one table: both batches read it)
    assert "### self-supervised and supervised batches:" in text
    frame = read_manifests([manifest])
    labels = resolve_manifest_labels(frame, tree)
    for node in ("neutrophil_segmented", "neutrophil", "granulocytic_immature"):
        index = tree.index(node)
        cells = _row(text, f"{node} (leaf)" if tree.is_leaf(node) else node)
        expected = [int(((labels == index) & (frame["dataset"] == d)).sum()) for d in ("demo_coarse", "demo_fine")]
        assert [int(c) for c in cells] == [*expected, sum(expected)], node
    assert _row(text, "**all images**")[-1] == str(len(frame))
    # config diff against the defaults
    assert '| `student.arch` | `"vit_large"` | `"vit_test"` |' in text
    assert '| `compute_precision.dtype` | `"auto"` | `"fp32"` |' in text
    assert ("student.arch", "vit_large", "vit_test") in config_changes(cfg)
    assert "## Evaluation\n\nNone yet" in text


def test_card_of_an_unreadable_manifest_says_so(tmp_path, manifest):
    _, text = _card(tmp_path, manifest, **{"train.dataset_path_unsup": f"[{tmp_path / 'moved.csv'}]"})
    assert "Not readable where this card was written: manifest" in text and "moved.csv" in text


def test_evaluation_section_is_replaced_by_a_later_eval(tmp_path, manifest, capsys):
    _card(tmp_path, manifest)
    card = tmp_path / "out" / "MODEL_CARD.md"
    before = card.read_text()
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    assert model_card.main([str(card), "--evaluation", str(metrics)]) == 0
    assert f"updated {card}" in capsys.readouterr().out
    text = card.read_text()
    assert text.split("## Evaluation")[0] == before.split("## Evaluation")[0]
    assert _row(text, "knn_k20") == ["0.812", "0.750", "n/a", "n/a", "1.500"]
    assert _row(text, "head") == ["0.900", "0.850", "n/a", "0.950", "n/a"]
    assert "on `test.csv` (40 samples, train/test split)" in text
    set_card_evaluation(card, metrics)  # idempotent: one evaluation section
    assert card.read_text() == text
    # another export of the same step keeps the evaluation; one of a later step drops it
    assert "| knn_k20 |" in _card(tmp_path, manifest)[1]
    assert "None yet" in _card(tmp_path, manifest, step=6)[1]
    with pytest.raises(DataError, match="not an eval_hier metrics.json"):
        metrics.write_text(json.dumps({"protocols": {}}))
        set_card_evaluation(card, metrics)
    with pytest.raises(DataError, match="not a model card"):
        set_card_evaluation(metrics, metrics)
