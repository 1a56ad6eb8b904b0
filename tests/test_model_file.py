"""Model file: atomic save, weights_only load, backbone/head/tree rebuilt, head validated against the tree."""

import pytest
import torch
from torch import nn

from dinov2.errors import CheckpointError
from dinov2.hierarchy import Tree
from dinov2.models import arch_config, build_backbone
from dinov2.models.model_file import load_model_file, save_model_file
from dinov2.models.weights import load_pretrained

NESTED = {"myeloid": {"granulocyte": ["neutrophil", "eosinophil"], "monocyte": None}, "lymphocyte": None}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture
def exported(tmp_path):
    tree = Tree.from_nested(NESTED)
    backbone = build_backbone("vit_test", img_size=98, num_register_tokens=4)
    with torch.no_grad():
        for param in backbone.parameters():
            param.normal_(0.0, 0.2)
    head = nn.Linear(32, len(tree.leaves))
    path = save_model_file(tmp_path / "out" / "model.pth", backbone, head, tree, "v1", 98, MEAN, STD)
    return path, backbone.eval(), head, tree


def test_round_trip_rebuilds_everything(exported):
    path, backbone, head, tree = exported
    loaded = load_model_file(path)
    assert loaded.arch == arch_config(backbone)
    assert not loaded.backbone.training and not loaded.supervised_head.training
    images = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(images), backbone(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.supervised_head.weight, head.weight, rtol=0, atol=0)
        torch.testing.assert_close(loaded.supervised_head.bias, head.bias, rtol=0, atol=0)
    assert loaded.tree == tree and loaded.tree.leaves == ("neutrophil", "eosinophil", "monocyte", "lymphocyte")
    assert (loaded.hierarchy, loaded.image_size, loaded.mean, loaded.std) == ("v1", 98, MEAN, STD)


def test_file_is_plain_data_and_written_atomically(exported):
    path, backbone, _, _ = exported
    content = torch.load(path, weights_only=True)
    assert content["format"] == "dino_hier.model" and content["version"] == 1
    assert set(content["supervised_head"]) == {"weight", "bias"}
    assert content["tree"] == NESTED
    assert set(content["backbone"]) == set(backbone.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temp file left behind


def test_backbone_of_a_model_file_loads_with_load_pretrained(exported):
    path, backbone, _, _ = exported
    model = load_pretrained(build_backbone("vit_test", img_size=98, num_register_tokens=4), path)
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_without_head_and_tree(tmp_path):
    path = save_model_file(tmp_path / "bare.pth", build_backbone("vit_test"), None, None, None, 224, MEAN, STD)
    loaded = load_model_file(path)
    assert loaded.supervised_head is None and loaded.tree is None and loaded.hierarchy is None


def test_head_that_does_not_match_the_tree_is_refused(exported, tmp_path):
    path, _, _, _ = exported
    content = torch.load(path, weights_only=True)
    content["supervised_head"] = {"weight": torch.zeros(3, 32), "bias": torch.zeros(3)}
    bad = tmp_path / "bad.pth"
    torch.save(content, bad)
    with pytest.raises(CheckpointError, match="3 outputs but the tree has 4 leaves"):
        load_model_file(bad)
    with pytest.raises(CheckpointError, match="3 outputs but the tree has 4 leaves"):
        save_model_file(
            tmp_path / "x.pth",
            build_backbone("vit_test"),
            nn.Linear(32, 3),
            Tree.from_nested(NESTED),
            "v1",
            224,
            MEAN,
            STD,
        )
    assert not (tmp_path / "x.pth").exists()


def test_not_a_model_file(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(build_backbone("vit_test").state_dict(), path)
    with pytest.raises(CheckpointError, match="not a dino_hier model file"):
        load_model_file(path)
