"""DINOv2 ViT: key layout, equality with an independent functional forward, pos-embed interpolation,
crop lists, masking, registers, SwiGLU widths, stochastic depth, autocast, build_backbone/arch_config."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dinov2.errors import ConfigError
from dinov2.layers import drop_add_residual_stochastic_depth, drop_path, swiglu_hidden_features
from dinov2.layers.attention import Attention
from dinov2.models import arch_config, build_backbone

# (embed, depth, heads, FFN hidden width or None for MLP 4x) as published for DINOv2
OFFICIAL = {
    "vit_small": (384, 12, 6, None),
    "vit_base": (768, 12, 12, None),
    "vit_large": (1024, 24, 16, None),
    "vit_giant2": (1536, 40, 24, 4096),
    "vit_test": (32, 2, 2, None),
}


def expected_shapes(dim, depth, swiglu_hidden, registers, tokens, patch=14):
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, tokens, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "ls1.gamma": (dim,),
                b + "ls2.gamma": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
            }
        )
        if swiglu_hidden:
            shapes.update(
                {
                    b + "mlp.w12.weight": (2 * swiglu_hidden, dim),
                    b + "mlp.w12.bias": (2 * swiglu_hidden,),
                    b + "mlp.w3.weight": (dim, swiglu_hidden),
                    b + "mlp.w3.bias": (dim,),
                }
            )
        else:
            shapes.update(
                {
                    b + "mlp.fc1.weight": (4 * dim, dim),
                    b + "mlp.fc1.bias": (4 * dim,),
                    b + "mlp.fc2.weight": (dim, 4 * dim),
                    b + "mlp.fc2.bias": (dim,),
                }
            )
    return shapes


@pytest.mark.parametrize("arch", sorted(OFFICIAL))
@pytest.mark.parametrize("registers", [0, 4])
def test_state_dict_layout_matches_dinov2(arch, registers):
    dim, depth, _, swiglu_hidden = OFFICIAL[arch]
    with torch.device("meta"):
        model = build_backbone(arch, img_size=518, num_register_tokens=registers)
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected_shapes(dim, depth, swiglu_hidden, registers, tokens=1370)
    assert model.embed_dim == dim and model.patch_size == 14 and model.num_heads == OFFICIAL[arch][2]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * depth + 1 and all(m.eps == 1e-6 for m in norms)
    assert all(m.approximate == "none" for m in model.modules() if isinstance(m, torch.nn.GELU))


def test_swiglu_hidden_width_formula():
    assert swiglu_hidden_features(4 * 1536) == 4096
    assert swiglu_hidden_features(4 * 384) == 1024
    assert swiglu_hidden_features(4 * 32) == 88  # int(85.33) = 85 -> rounded up to a multiple of 8
    model = build_backbone("vit_test", ffn_layer="swiglufused")
    assert tuple(model.blocks[0].mlp.w12.weight.shape) == (176, 32)
    assert tuple(model.blocks[0].mlp.w3.weight.shape) == (32, 88)


# ---------------------------------------------------------------- independent functional reference


def _layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_features(sd, images, masks, heads, offset=0.1, antialias=False, patch=14):
    """DINOv2's forward written from its math, from a state dict only."""
    batch, chans, height, width = images.shape
    dim = sd["cls_token"].shape[-1]
    rows, cols = height // patch, width // patch
    pixels = images.reshape(batch, chans, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    x = pixels.reshape(batch, rows * cols, -1) @ sd["patch_embed.proj.weight"].reshape(dim, -1).T
    x = x + sd["patch_embed.proj.bias"]
    if masks is not None:
        x = torch.where(masks[..., None], sd["mask_token"][None], x)
    pos = sd["pos_embed"]
    side = int(math.isqrt(pos.shape[1] - 1))
    if (rows, cols) == (side, side):
        patch_pos = pos[:, 1:]
    else:
        grid = pos[0, 1:].reshape(side, side, dim).permute(2, 0, 1)[None]
        if offset:
            grid = F.interpolate(
                grid, scale_factor=((rows + offset) / side, (cols + offset) / side), mode="bicubic", antialias=antialias
            )
        else:
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=antialias)
        patch_pos = grid[0].permute(1, 2, 0).reshape(1, rows * cols, dim)
    parts = [(sd["cls_token"] + pos[:, :1]).expand(batch, -1, -1)]
    registers = sd.get("register_tokens")
    if registers is not None:
        parts.append(registers.expand(batch, -1, -1))
    x = torch.cat(parts + [x + patch_pos], dim=1)
    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})
    head_dim = dim // heads
    for i in range(depth):
        p = lambda name, i=i: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = _layer_norm(x, p("norm1.weight"), p("norm1.bias"))
        qkv = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).reshape(batch, -1, 3, heads, head_dim)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, -1, dim)
        x = x + p("ls1.gamma") * (attended @ p("attn.proj.weight").T + p("attn.proj.bias"))
        h = _layer_norm(x, p("norm2.weight"), p("norm2.bias"))
        if f"blocks.{i}.mlp.w12.weight" in sd:
            gate, value = (h @ p("mlp.w12.weight").T + p("mlp.w12.bias")).chunk(2, dim=-1)
            ffn = (gate * torch.sigmoid(gate) * value) @ p("mlp.w3.weight").T + p("mlp.w3.bias")
        else:
            ffn = _gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
        x = x + p("ls2.gamma") * ffn
    normed = _layer_norm(x, sd["norm.weight"], sd["norm.bias"])
    first_patch = 1 + (registers.shape[1] if registers is not None else 0)
    return {
        "x_norm_clstoken": normed[:, 0],
        "x_norm_regtokens": normed[:, 1:first_patch],
        "x_norm_patchtokens": normed[:, first_patch:],
        "x_prenorm": x,
    }


def randomized(model, scale=0.3):
    """Every parameter random (LayerNorm affine, biases, LayerScale and mask_token included)."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, scale)
    return model.eval()


REFERENCE_CASES = {
    "mlp-nonsquare": (dict(), (2, 3, 28, 70), True),
    "swiglu-registers": (dict(ffn_layer="swiglufused", num_register_tokens=4), (2, 3, 42, 42), True),
    "matching-grid": (dict(img_size=56, num_register_tokens=4), (3, 3, 56, 56), False),
    "reg-style-interpolation": (
        dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True),
        (1, 3, 98, 56),
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_forward_equals_functional_reference(case):
    overrides, shape, with_masks = REFERENCE_CASES[case]
    model = randomized(build_backbone("vit_test", **overrides))
    images = torch.randn(shape)
    patches = (shape[2] // 14) * (shape[3] // 14)
    masks = torch.rand(shape[0], patches) < 0.4 if with_masks else None
    with torch.no_grad():
        got = model.forward_features(images, masks=masks)
        want = reference_features(
            model.state_dict(),
            images,
            masks,
            heads=2,
            offset=model.interpolate_offset,
            antialias=model.interpolate_antialias,
        )
    for key, value in want.items():  # LayerNorm outputs to 1e-5; the residual stream (|x| ~ 20) relative to it
        assert got[key].shape == value.shape, key
        atol = 1e-5 * max(1.0, value.abs().max().item()) if value.numel() else 0.0
        torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=key)
    assert got["masks"] is masks
    # unmasked, an eval model(x) computes the last block for the CLS token alone: equal to rounding
    torch.testing.assert_close(model(images, masks=masks), got["x_norm_clstoken"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- position embeddings


def _offset_interpolation(pos_embed, rows, cols):
    """DINOv2's rule computed here: scale factors (rows + 0.1) / M and (cols + 0.1) / M, bicubic, no antialias."""
    dim = pos_embed.shape[-1]
    side = int(math.isqrt(pos_embed.shape[1] - 1))
    grid = pos_embed[0, 1:].reshape(side, side, dim).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1], grid[0].permute(1, 2, 0).reshape(1, rows * cols, dim)], dim=1)


@pytest.mark.parametrize("size", [(224, 224), (98, 98), (70, 126), (112, 448)])
def test_pos_embed_interpolation_uses_dinov2_offset(size):
    model = build_backbone("vit_test", img_size=518)
    rows, cols = size[0] // 14, size[1] // 14
    tokens = torch.zeros(1, 1 + rows * cols, 32)
    got = model.interpolate_pos_encoding(tokens, *size)
    want = _offset_interpolation(model.pos_embed.detach(), rows, cols)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    by_size = F.interpolate(
        model.pos_embed.detach()[0, 1:].reshape(37, 37, 32).permute(2, 0, 1)[None], size=(rows, cols), mode="bicubic"
    )
    assert not torch.equal(got[0, 1:], by_size[0].permute(1, 2, 0).reshape(rows * cols, 32))


def test_pos_embed_untouched_when_grid_matches_but_resampled_for_same_count_non_square():
    model = build_backbone("vit_test", img_size=224)  # 16 x 16 grid
    square = model.interpolate_pos_encoding(torch.zeros(1, 257, 32), 224, 224)
    assert square is model.pos_embed
    wide = model.interpolate_pos_encoding(torch.zeros(1, 257, 32), 112, 448)  # 8 x 32, also 256 patches
    torch.testing.assert_close(wide, _offset_interpolation(model.pos_embed.detach(), 8, 32), rtol=0, atol=0)


# ---------------------------------------------------------------- crops, masks, registers


@pytest.mark.parametrize("overrides", [{}, {"num_register_tokens": 4}, {"ffn_layer": "swiglufused"}, {"depth": 0}])
def test_cls_token_shortcut_equals_the_full_forward(overrides):
    model = randomized(build_backbone("vit_test", **overrides))
    images = torch.randn(3, 3, 42, 56)
    with torch.no_grad():
        full = model.forward_features(images)["x_norm_clstoken"]
        torch.testing.assert_close(model.forward_clstoken(images), full, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(images), full, rtol=0, atol=1e-5)  # eval forward takes the shortcut
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(
                model.forward_clstoken(images).float(),
                model.forward_features(images)["x_norm_clstoken"].float(),
                rtol=0.02,
                atol=0.02,
            )
    with pytest.raises(RuntimeError, match="inference"):
        model.train().forward_clstoken(images)


def test_crop_list_equals_crop_by_crop():
    model = randomized(build_backbone("vit_test", num_register_tokens=4))
    crops = [torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)]
    masks = [torch.rand(2, 16) < 0.5, None]
    with torch.no_grad():
        together = model.forward_features(crops, masks=masks)
        separately = [model.forward_features(x, masks=m) for x, m in zip(crops, masks)]
    assert isinstance(together, list) and len(together) == 2
    for joint, alone in zip(together, separately):
        assert set(joint) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(joint[key], alone[key], rtol=0, atol=1e-6)
    assert together[0]["masks"] is masks[0] and together[1]["masks"] is None


def test_mask_token_replaces_exactly_the_masked_patches():
    model = randomized(build_backbone("vit_test", depth=0, num_register_tokens=4))
    images = torch.randn(2, 3, 42, 42)
    masks = torch.zeros(2, 9, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[1, 8] = True
    with torch.no_grad():
        masked = model.forward_features(images, masks=masks)["x_prenorm"][:, 5:]  # after cls + 4 registers
        plain = model.forward_features(images)["x_prenorm"][:, 5:]
        pos = model.interpolate_pos_encoding(torch.zeros(1, 10, 32), 42, 42)[0, 1:]
    assert torch.equal(masked[~masks], plain[~masks])
    torch.testing.assert_close(masked[masks], (model.mask_token + pos.expand(2, -1, -1)[masks]).detach())


def test_register_tokens_sit_between_cls_and_patches():
    model = randomized(build_backbone("vit_test", depth=0, num_register_tokens=4))
    with torch.no_grad():
        out = model.forward_features(torch.randn(3, 3, 28, 28))
    assert out["x_norm_regtokens"].shape == (3, 4, 32)
    assert out["x_norm_patchtokens"].shape == (3, 4, 32)
    torch.testing.assert_close(out["x_prenorm"][:, 1:5], model.register_tokens.detach().expand(3, -1, -1))
    no_registers = build_backbone("vit_test").forward_features(torch.randn(1, 3, 28, 28))
    assert no_registers["x_norm_regtokens"].shape == (1, 0, 32)


def test_image_size_not_multiple_of_patch_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        build_backbone("vit_test")(torch.randn(1, 3, 30, 28))


# ---------------------------------------------------------------- stochastic depth


def test_drop_path_rates_linear_or_uniform():
    ramp = build_backbone("vit_test", depth=5, drop_path_rate=0.4)
    uniform = build_backbone("vit_test", depth=5, drop_path_rate=0.4, drop_path_uniform=True)
    assert [b.sample_drop_ratio for b in ramp.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert [b.sample_drop_ratio for b in uniform.blocks] == pytest.approx([0.4] * 5)


def test_drop_path_keeps_or_drops_whole_samples_and_rescales():
    branch = torch.ones(1000, 3, 2)
    out = drop_path(branch, 0.25, training=True)
    per_sample = out.flatten(1)
    assert torch.all((per_sample == 0).all(1) | torch.isclose(per_sample, torch.tensor(4 / 3)).all(1))
    assert 0.6 < (per_sample[:, 0] > 0).float().mean() < 0.9
    assert torch.equal(drop_path(branch, 0.25, training=False), branch)


def test_subset_stochastic_depth_updates_a_subset_scaled_by_batch_over_subset():
    x = torch.zeros(8, 3, 2)
    out = drop_add_residual_stochastic_depth(x, lambda rows: torch.ones_like(rows), drop_prob=0.5)
    changed = (out != 0).flatten(1).all(1)
    assert changed.sum() == 4  # int(8 * 0.5) samples get the branch
    assert torch.all(out[changed] == 2.0) and torch.all(out[~changed] == 0.0)


def test_training_with_drop_path_runs_and_backpropagates():
    model = build_backbone("vit_test", drop_path_rate=0.5, drop_path_uniform=True).train()
    outs = model([torch.randn(4, 3, 28, 28), torch.randn(4, 3, 14, 14)], is_training=True)
    sum(o["x_norm_clstoken"].sum() for o in outs).backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------- precision and build API


def test_bf16_autocast_forward_backward_close_to_fp32():
    model = randomized(build_backbone("vit_test", num_register_tokens=4), scale=0.1)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        fp32 = model.forward_features(images)["x_norm_clstoken"]
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.forward_features(images)["x_norm_clstoken"]
    bf16.float().sum().backward()
    assert model.cls_token.grad is not None and model.cls_token.grad.dtype == torch.float32
    assert (bf16.float() - fp32).abs().max() < 0.1


def test_arch_config_rebuilds_same_layout_and_is_json():
    model = build_backbone("vit_test", img_size=98, num_register_tokens=4, ffn_layer="swiglufused", init_values=1.0)
    config = json.loads(json.dumps(arch_config(model)))
    assert config["arch"] == "vit_test"
    for key in ("img_size", "patch_size", "num_register_tokens", "ffn_layer", "embed_dim", "depth", "num_heads"):
        assert key in config
    rebuilt = build_backbone(**config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert arch_config(rebuilt) == config


def test_no_layerscale_when_init_values_is_none():
    keys = build_backbone("vit_test", init_values=None).state_dict()
    assert not any("gamma" in key for key in keys)


def test_build_backbone_rejects_unknown_arch_and_options():
    with pytest.raises(ConfigError, match="vit_huge"):
        build_backbone("vit_huge")
    with pytest.raises(ConfigError, match="embed_dimm"):
        build_backbone("vit_test", embed_dimm=8)
    with pytest.raises(ConfigError, match="swiglu3"):
        build_backbone("vit_test", ffn_layer="swiglu3")


def test_init_follows_dinov2():
    torch.manual_seed(0)
    model = build_backbone("vit_small", num_register_tokens=4)
    assert model.cls_token.std() < 1e-5 and model.register_tokens.std() < 1e-5
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert torch.all(model.mask_token == 0)
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002 and torch.all(qkv.bias == 0)
    assert torch.all(model.blocks[3].ls2.gamma == 1e-5)


def test_xformers_is_never_used_for_cpu_tensors(monkeypatch):
    from dinov2.layers import attention

    def installed_xformers(*args, **kwargs):
        raise AssertionError("xformers called for CPU tensors")

    monkeypatch.setattr(attention, "memory_efficient_attention", installed_xformers)  # CPU still goes through SDPA
    model = randomized(build_backbone("vit_test"))
    crops = [torch.randn(2, 3, 28, 28), torch.randn(1, 3, 14, 14)]
    with torch.no_grad():
        together = model.forward_features(crops)
    torch.testing.assert_close(together[1]["x_prenorm"], model.forward_features(crops[1])["x_prenorm"])


def test_meta_device_build_then_init_weights_materialises_everything():
    with torch.device("meta"):
        model = build_backbone("vit_test", num_register_tokens=4)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.all(model.blocks[1].ls2.gamma == 1e-5) and torch.all(model.norm.weight == 1)
    assert torch.all(model.mask_token == 0) and torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model(torch.randn(1, 3, 28, 28)).isfinite().all()


def test_cpu_bf16_attention_agrees_with_fp32_sdpa():
    """Under CPU bf16 autocast the attention product is written out (a speed trick); the plain
    version is SDPA: output and input gradient agree with an fp32 SDPA forward to bf16 precision."""
    torch.manual_seed(0)
    attention = Attention(64, num_heads=4)
    x = torch.randn(3, 50, 64, requires_grad=True)
    upstream = torch.randn(3, 50, 64)
    reference = attention(x)  # fp32: SDPA
    (want,) = torch.autograd.grad(reference, x, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(x)
    (got,) = torch.autograd.grad(out, x, upstream)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.01)
    torch.testing.assert_close(got, want, rtol=0, atol=0.01)
