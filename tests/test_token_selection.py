"""The last block computed for the selected tokens only equals the full block at those tokens."""

import pytest
import torch

from dinov2.layers import Block, TokenSelection, branch_scales, drop_add_residual_stochastic_depth, drop_path
from dinov2.models import build_backbone


def test_selection_layout_roundtrip():
    wanted = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    sel = TokenSelection.from_mask(wanted)
    assert sel.width == 3 and sel.n_samples == 3
    assert sel.rows.tolist() == [0, 2, 3, 4, 9, 11]
    assert sel.sample.tolist() == [0, 0, 0, 1, 2, 2]
    assert sel.slots.tolist() == [0, 1, 2, 3, 6, 7]
    assert sel.is_first().tolist() == [True, False, False, True, True, False]
    x = torch.arange(3 * 4 * 2.0).view(3, 4, 2)
    rows = sel.gather(x)
    torch.testing.assert_close(rows, x[wanted])
    padded = sel.pad(rows)
    assert padded.shape == (3, 3, 2) and padded[1, 1:].abs().sum() == 0 and padded[2, 2].abs().sum() == 0
    torch.testing.assert_close(sel.unpad(padded), rows)
    with pytest.raises(ValueError, match="bool"):
        TokenSelection.from_mask(wanted.long())


def test_first_and_patches_skips_registers():
    patches = torch.tensor([[False, True, False], [False, False, False]])
    sel = TokenSelection.first_and_patches(patches, 2, 1 + 2 + 3, first_patch=3)
    assert sel.rows.tolist() == [0, 4, 6]  # CLS, patch 1 of image 0 (token 4), CLS of image 1


@pytest.mark.parametrize("subset", [False, True])
def test_branch_scales_draw_what_the_two_drop_forms_draw(subset):
    x = torch.randn(10, 5, 3)
    torch.manual_seed(3)
    scales = branch_scales(10, 0.4, x, subset=subset)
    torch.manual_seed(3)
    if subset:
        expected = drop_add_residual_stochastic_depth(torch.zeros_like(x), torch.ones_like, 0.4)[:, 0, 0]
    else:
        expected = drop_path(torch.ones_like(x), 0.4, training=True)[:, 0, 0]
    torch.testing.assert_close(scales, expected, rtol=0, atol=0)
    assert 0 < int((scales == 0).sum()) < 10


def _block(drop: float) -> Block:
    torch.manual_seed(0)
    block = Block(dim=24, num_heads=3, drop_path=drop, init_values=0.5)
    for p in block.parameters():  # away from the init so every path carries signal
        p.data.add_(0.1 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("drop,train", [(0.0, False), (0.0, True), (0.1, True), (0.4, True)])
def test_block_selected_equals_full_block_at_the_selection(drop, train):
    block = _block(drop).train(train)
    x = torch.randn(6, 9, 24, requires_grad=True)
    wanted = torch.rand(6, 9) < 0.3
    wanted[:, 0] = True
    wanted[2, 1:] = True  # one image with every token
    sel = TokenSelection.from_mask(wanted)
    grad_out = torch.randn(sel.rows.numel(), 24)

    torch.manual_seed(7)
    full = sel.gather(block(x))
    (full * grad_out).sum().backward()
    full_grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    torch.manual_seed(7)
    selected = block(x, selection=sel)
    (selected * grad_out).sum().backward()
    torch.testing.assert_close(selected, full, rtol=1e-5, atol=1e-6)
    for got, expected in zip([x.grad] + [p.grad for p in block.parameters()], full_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    if drop > 0:  # the drop is live: another draw gives another result
        torch.manual_seed(8)
        assert not torch.allclose(block(x, selection=sel), full)


@pytest.mark.parametrize("registers", [0, 2])
def test_vit_selected_forward_equals_full_forward(registers):
    torch.manual_seed(0)
    model = build_backbone(
        "vit_test", img_size=56, drop_path_rate=0.3, drop_path_uniform=True, num_register_tokens=registers
    ).train()
    global_crops, local_crops = torch.randn(4, 3, 56, 56), torch.randn(4, 3, 28, 28)
    masks = torch.rand(4, 16) < 0.4
    masks[1] = False
    torch.manual_seed(5)
    full = model.forward_features([global_crops, local_crops], masks=[masks, None])
    torch.manual_seed(5)
    got = model.forward_features_selected([global_crops, local_crops], [masks, None], [masks, None])
    torch.testing.assert_close(got[0]["x_norm_clstoken"], full[0]["x_norm_clstoken"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0]["x_norm_patchtokens"], full[0]["x_norm_patchtokens"][masks], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1]["x_norm_clstoken"], full[1]["x_norm_clstoken"], rtol=1e-5, atol=1e-6)
    assert got[1]["x_norm_patchtokens"].shape == (0, 32)


def test_vit_selected_forward_without_blocks():
    model = build_backbone("vit_test", img_size=28, depth=0).eval()
    images, masks = torch.randn(2, 3, 28, 28), torch.tensor([[True, False, False, True], [False] * 4])
    got = model.forward_features_selected([images], [None], [masks])[0]
    full = model.forward_features(images)
    torch.testing.assert_close(got["x_norm_patchtokens"], full["x_norm_patchtokens"][masks])
    with pytest.raises(ValueError, match="patch selections"):
        model.forward_features_selected([images], [None], [])


def test_flop_formula_counts_what_the_forward_runs():
    from torch.utils.flop_counter import FlopCounterMode

    from dinov2.utils.flops import vit_forward_flops

    model = build_backbone("vit_test", img_size=56, num_register_tokens=1).eval()
    images = torch.randn(3, 3, 56, 56)
    # bf16 on the CPU: attention as plain matmuls, which the counter sees (it skips CPU SDPA)
    with torch.autocast("cpu", dtype=torch.bfloat16), FlopCounterMode(display=False) as full:
        model.forward_features(images)
    with torch.autocast("cpu", dtype=torch.bfloat16), FlopCounterMode(display=False) as cls_only:
        model.forward_clstoken(images)
    assert full.get_total_flops() == vit_forward_flops(model, 56, 3)
    assert cls_only.get_total_flops() == vit_forward_flops(model, 56, 3, last_block_rows=3)


@pytest.mark.parametrize("separate_head", [True, False])
def test_training_objective_equals_the_one_from_full_forwards(monkeypatch, separate_head):
    """Every loss term and every student gradient of a step are what full forwards (every token
    through the last block, then indexed) give, with stochastic depth and registers on."""
    from dinov2.config.custom_hier import get_tree
    from dinov2.models.vision_transformer import DinoVisionTransformer
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.utils.config import load_config

    cfg = load_config(
        None,
        [
            "student.arch=vit_test",
            "student.patch_size=8",
            "student.num_register_tokens=1",
            "student.drop_path_rate=0.3",
            "student.drop_path_uniform=true",
            "dino.head_n_prototypes=32",
            "ibot.head_n_prototypes=32",
            "dino.head_hidden_dim=16",
            "ibot.head_hidden_dim=16",
            "crops.global_crops_size=32",
            "crops.local_crops_size=16",
            "crops.local_crops_number=2",
            "dino.local_loss=true",
            f"ibot.separate_head={str(separate_head).lower()}",
            "train.centering=sinkhorn_knopp",
        ],
    )
    tree = get_tree("v1")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg, tree).double()  # fp64: the two orders of summation agree to ~1e-12
    masks = torch.rand(4, 16) < 0.3
    masks[3] = False
    images = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    batch = {
        "collated_global_crops": images(4, 3, 32, 32),
        "collated_local_crops": images(4, 3, 16, 16),
        "collated_masks": masks,
        "n_masked_patches": torch.tensor([int(masks.sum())]),
        "masks_weight": None,
    }
    labels = torch.tensor([tree.index(n) for n in ("neutrophil", "monocyte", "lymphocyte_typical")])
    supervised = (images(3, 3, 32, 32), labels)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, terms = model.forward_losses(batch, supervised, teacher_temp=0.04)
        loss.backward()
        return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    terms, grads = step()

    def full_then_indexed(self, x_list, masks_list, patches_list):
        selected = []
        for out, patches in zip(self.forward_features_list(x_list, masks_list), patches_list):
            tokens = out["x_norm_patchtokens"]
            wanted = patches if patches is not None else torch.zeros(tokens.shape[:2], dtype=torch.bool)
            selected.append({"x_norm_clstoken": out["x_norm_clstoken"], "x_norm_patchtokens": tokens[wanted]})
        return selected

    monkeypatch.setattr(DinoVisionTransformer, "forward_features_selected", full_then_indexed)
    want_terms, want_grads = step()
    assert (
        terms.keys()
        == want_terms.keys()
        == {"dino_global", "dino_local", "ibot", "koleo", "supervised", "supervised_head"}
    )
    for name in terms:
        torch.testing.assert_close(terms[name], want_terms[name], rtol=1e-10, atol=1e-12, msg=name)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-9, atol=1e-10, msg=name)
