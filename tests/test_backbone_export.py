"""Backbone-only exports: timm loads them (its features equal ours), our loaders read .safetensors too."""

import pytest
import timm
import torch
from omegaconf import OmegaConf

from dinov2.errors import CheckpointError, ConfigError
from dinov2.models import arch_config, build_backbone
from dinov2.models.backbone_file import save_backbone_file, timm_model_args, timm_snippet
from dinov2.models.weights import load_pretrained, read_checkpoint
from dinov2.train import export
from dinov2.train.checkpointing import FORMAT
from dinov2.utils.config import load_config

LAYOUTS = {
    "plain": dict(arch="vit_custom", embed_dim=48, depth=2, num_heads=3),
    "registers": dict(arch="vit_custom", embed_dim=48, depth=2, num_heads=3, num_register_tokens=4),
    "swiglu_no_layerscale": dict(
        arch="vit_custom", embed_dim=48, depth=2, num_heads=3, ffn_layer="swiglufused", init_values=None
    ),
    "patch8_2_registers": dict(
        arch="vit_custom", embed_dim=32, depth=1, num_heads=2, patch_size=8, num_register_tokens=2
    ),
}


def _random_backbone(img_size=56, **layout):
    backbone = build_backbone(img_size=img_size, **layout)
    with torch.no_grad():
        for param in backbone.parameters():
            param.normal_(0.0, 0.2)
    return backbone.eval()


def _timm_from_file(path, backbone):
    name, kwargs = timm_model_args(arch_config(backbone))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs).eval()


def _assert_same_features(ours, theirs, img_size=56):
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        expected = ours.forward_features(images)
        tokens = theirs.forward_features(images)
        first_patch = 1 + ours.num_register_tokens
        torch.testing.assert_close(theirs(images), expected["x_norm_clstoken"], rtol=0, atol=1e-4)
        torch.testing.assert_close(tokens[:, 1:first_patch], expected["x_norm_regtokens"], rtol=0, atol=1e-4)
        torch.testing.assert_close(tokens[:, first_patch:], expected["x_norm_patchtokens"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_timm_features_equal_ours(tmp_path, layout, fmt):
    backbone = _random_backbone(**LAYOUTS[layout])
    path = save_backbone_file(tmp_path / f"backbone.{fmt}", backbone)
    _assert_same_features(backbone, _timm_from_file(path, backbone))
    # our own loader reads the file back exactly
    again = load_pretrained(build_backbone(img_size=56, **LAYOUTS[layout]), path)
    for key, value in backbone.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_timm_names_of_the_presets_need_no_extra_arguments():
    def args(arch, **extra):
        with torch.device("meta"):  # the layout only: no memory, no init cost for ViT-L/g
            return timm_model_args(arch_config(build_backbone(arch, img_size=224, **extra)))

    assert args("vit_small") == ("vit_small_patch14_dinov2", {"img_size": 224})
    assert args("vit_small", num_register_tokens=4) == ("vit_small_patch14_reg4_dinov2", {"img_size": 224})
    assert args("vit_base") == ("vit_base_patch14_dinov2", {"img_size": 224})
    assert args("vit_large") == ("vit_large_patch14_dinov2", {"img_size": 224})
    assert args("vit_large", num_register_tokens=4) == ("vit_large_patch14_reg4_dinov2", {"img_size": 224})
    assert args("vit_giant2") == ("vit_giant_patch14_dinov2", {"img_size": 224})
    assert args("vit_base", init_values=None) == ("vit_base_patch14_dinov2", {"init_values": 0.0, "img_size": 224})
    with pytest.raises(ConfigError, match="one bias switch"):
        args("vit_small", ffn_bias=False)


def test_export_cli_writes_a_backbone_timm_loads(tmp_path, capsys):
    """A training checkpoint -> ``--backbone-only --format safetensors`` -> timm, features equal."""
    cfg = load_config(
        None,
        [
            "student.arch=vit_test",
            "student.embed_dim=48",
            "student.num_heads=3",
            "student.num_register_tokens=4",
            "crops.global_crops_size=56",
        ],
    )
    backbone = _random_backbone(**LAYOUTS["registers"])
    state = {
        "format": FORMAT,
        "model": {f"teacher.backbone.{k}": v for k, v in backbone.state_dict().items()},
        "config": OmegaConf.to_container(cfg),
        "step": 7,
    }
    torch.save(state, tmp_path / "checkpoint_0000007.pth")
    assert export.main([str(tmp_path), "--backbone-only", "--format", "safetensors"]) == 0
    path = tmp_path / "backbone.safetensors"
    assert f"-> {path}" in capsys.readouterr().out
    assert set(read_checkpoint(path)) == set(backbone.state_dict())  # flat DINOv2 keys, nothing else
    _assert_same_features(backbone, _timm_from_file(path, backbone))
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: dino_hier `vit_test`, step 7")
    assert "| `backbone.safetensors` | teacher backbone alone, official DINOv2 keys" in card
    assert (
        '"vit_small_patch14_reg4_dinov2", pretrained=True, pretrained_cfg_overlay={"file": "backbone.safetensors"}'
        in card
    )


@pytest.mark.slow
@pytest.mark.parametrize("registers", [0, 4])
def test_timm_vit_small_dinov2_loads_a_vit_small_export_with_only_img_size(tmp_path, registers):
    backbone = _random_backbone(arch="vit_small", num_register_tokens=registers)
    path = save_backbone_file(tmp_path / "backbone.pth", backbone)
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    assert timm_model_args(arch_config(backbone)) == (name, {"img_size": 56})
    assert timm_snippet(path, arch_config(backbone)).endswith(
        f'"{name}", pretrained=True, pretrained_cfg_overlay={{"file": "{path}"}},\n    img_size=56)'
    )
    theirs = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, img_size=56)
    _assert_same_features(backbone, theirs.eval())


def test_unreadable_safetensors_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        read_checkpoint(path)


def test_format_must_match_the_suffix(tmp_path):
    with pytest.raises(ConfigError, match="contradicts"):
        save_backbone_file(tmp_path / "backbone.pth", _random_backbone(**LAYOUTS["plain"]), "safetensors")
