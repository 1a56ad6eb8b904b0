"""Unit tests of the trainer's pieces: head, DINO / iBOT / KoLeo losses, schedules, param groups, env."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dinov2.config.custom_hier import get_tree
from dinov2.distributed import read_env
from dinov2.layers.dino_head import DINOHead, adapt_head_state_dict
from dinov2.loss.dino_clstoken_loss import DINOLoss, soft_cross_entropy
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss
from dinov2.loss.teacher_centering import sinkhorn_knopp
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config
from dinov2.utils.param_groups import build_param_groups, param_group_key
from dinov2.utils.schedules import CosineSchedule, scaled_lr


def test_dino_head_has_dinov2_keys_and_unit_norm_prototypes():
    head = DINOHead(32, 100, nlayers=3, hidden_dim=48, bottleneck_dim=16)
    assert sorted(head.state_dict()) == sorted(
        [
            "mlp.0.weight",
            "mlp.0.bias",
            "mlp.2.weight",
            "mlp.2.bias",
            "mlp.4.weight",
            "mlp.4.bias",
            "last_layer.weight_g",
            "last_layer.weight_v",
        ]
    )
    assert head.last_layer.weight_g.shape == (100, 1) and head.last_layer.weight_v.shape == (100, 16)
    logits = head(torch.randn(5, 32))
    # with g = 1 the logits are cosines between the bottleneck and each prototype
    assert logits.shape == (5, 100) and logits.abs().max() <= 1 + 1e-5
    renamed = adapt_head_state_dict(
        {"last_layer.parametrizations.weight.original0": 1, "last_layer.parametrizations.weight.original1": 2}
    )
    assert renamed == {"last_layer.weight_g": 1, "last_layer.weight_v": 2}


def test_dino_loss_is_cross_entropy_and_center_is_an_ema():
    loss = DINOLoss(4, student_temp=0.5, center_momentum=0.9)
    student = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    expected = -(teacher * F.log_softmax(student / 0.5, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(loss([student], [teacher]), expected)
    torch.testing.assert_close(loss([student, student], [teacher]), 2 * expected)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]])
    loss.update_center(logits)
    torch.testing.assert_close(loss.center, 0.1 * logits.mean(0, keepdim=True))
    probs = loss.softmax_center_teacher(logits, 0.1)
    torch.testing.assert_close(probs, F.softmax((logits - loss.center) / 0.1, dim=-1))


@pytest.mark.parametrize("loss_class", [DINOLoss, iBOTPatchLoss])
def test_both_losses_keep_their_teacher_centre_under_the_checkpoint_key_center(loss_class):
    loss = loss_class(4, center_momentum=0.5)
    assert list(loss.state_dict()) == ["center"]
    loss.load_state_dict({"center": torch.full((1, 4), 2.0)})
    loss.update_center(torch.zeros(3, 4))
    torch.testing.assert_close(loss.center, torch.ones(1, 4))


def test_soft_cross_entropy_of_bf16_logits_is_computed_in_fp32():
    torch.manual_seed(0)
    student = (torch.randn(6, 1000) * 3).bfloat16().requires_grad_()
    teacher = F.softmax(torch.randn(6, 1000, dtype=torch.float64), dim=-1)
    teacher[5] = 0.0  # a row without mass contributes nothing
    loss = soft_cross_entropy(student, teacher.float(), 0.1)
    exact = -(teacher * F.log_softmax(student.double() / 0.1, dim=-1)).sum(-1)
    assert loss.dtype == torch.float32 and loss[5] == 0
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-5)  # bf16 arithmetic: ~1e-2
    loss.sum().backward()
    assert student.grad.dtype == torch.bfloat16


def test_weight_norm_head_loads_torch_weight_norm_weights_and_computes_the_same():
    """A ``torch.nn.utils.parametrizations.weight_norm`` layer's state (DINOv2's other layout) loads
    into the head's last layer, which then gives the same output and gradients."""
    torch.manual_seed(0)
    reference = weight_norm(nn.Linear(16, 7, bias=False)).double()
    with torch.no_grad():
        reference.parametrizations.weight.original0.uniform_(0.5, 2.0)  # g
    head = DINOHead(12, 7, nlayers=2, hidden_dim=8, bottleneck_dim=16).double()
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer.")}
    state.update({f"last_layer.{k}": v for k, v in reference.state_dict().items()})
    head.load_state_dict(adapt_head_state_dict(state))
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 7, dtype=torch.float64)
    layer, original = head.last_layer, reference.parametrizations.weight
    torch.testing.assert_close(layer(x), reference(x))
    ours = torch.autograd.grad(layer(x), (x, layer.weight_g, layer.weight_v), upstream)
    theirs = torch.autograd.grad(reference(x), (x, original.original0, original.original1), upstream)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want)


def test_sinkhorn_balances_prototypes_and_survives_sharp_logits():
    logits = torch.randn(12, 6) * 0.3
    q = sinkhorn_knopp(logits, teacher_temp=0.04, n_iterations=100)
    torch.testing.assert_close(q.sum(1), torch.ones(12))  # every sample is a distribution
    torch.testing.assert_close(q.sum(0), torch.full((6,), 2.0), atol=1e-3, rtol=0)  # every prototype gets B/K
    sharp = sinkhorn_knopp(torch.randn(12, 6) * 2, 0.01)  # exp(+-600) without the shift
    assert torch.isfinite(sharp).all() and (sharp.sum(1) <= 1 + 1e-5).all()
    # three iterations from exp(z / tau), as DINOv2 (the shift changes nothing)
    z = torch.randn(5, 4) * 0.1
    q = torch.exp(z / 0.1).t()
    for _ in range(3):
        q = q / q.sum(1, keepdim=True) / 4
        q = q / q.sum(0, keepdim=True) / 5
    torch.testing.assert_close(sinkhorn_knopp(z, 0.1), (q * 5).t())
    assert sinkhorn_knopp(torch.zeros(0, 3), 0.04).shape == (0, 3)


def _dinov2_sinkhorn(logits, temp, n_iterations=3):
    """DINOv2's published iteration, in the prototype x sample layout it uses."""
    q = torch.exp(logits / temp).t()
    n_prototypes, n_samples = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(1, keepdim=True) / n_prototypes
        q = q / q.sum(0, keepdim=True) / n_samples
    return (q * n_samples).t()


def test_sinkhorn_gives_a_sample_far_below_every_prototype_its_exact_row():
    """exp(-300) underflows fp32 but not fp64: the fp32 targets still equal the fp64 ones."""
    z = torch.randn(6, 5, dtype=torch.float64) * 0.3
    z[0] -= 30.0  # 300 below every column maximum at tau = 0.1
    expected = _dinov2_sinkhorn(z, 0.1)
    assert expected[0].sum() > 0.99  # the exact result gives the sample a full row
    torch.testing.assert_close(sinkhorn_knopp(z.float(), 0.1), expected.float())
    torch.testing.assert_close(sinkhorn_knopp(z, 0.1), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sinkhorn_of_fp64_or_bf16_logits_equals_the_textbook_iteration_in_fp64(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(11, 7, dtype=torch.float64) * 0.5).to(dtype)
    q = torch.exp(logits.double() / 0.05)
    for _ in range(3):  # columns to 1/K, rows to 1/B, from exp(z / tau)
        q = q / q.sum(0, keepdim=True) / 7
        q = q / q.sum(1, keepdim=True) / 11
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    teacher = sinkhorn_knopp(logits, 0.05)
    assert teacher.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(teacher.double(), q * 11, **tol)


def test_ibot_loss_weighs_each_masked_image_equally():
    loss = iBOTPatchLoss(3, student_temp=1.0)
    masks = torch.tensor([[True, False, False], [True, True, True], [False, False, False]])
    n = int(masks.sum())
    student = torch.randn(n, 3)
    teacher = F.softmax(torch.randn(n, 3), dim=-1)
    per_patch = -(teacher * F.log_softmax(student, dim=-1)).sum(-1)
    expected = (per_patch[0] + per_patch[1:].mean()) / 3  # mean over images (the unmasked one counts as 0)
    torch.testing.assert_close(loss.forward_masked(student, teacher, masks), expected)


def test_koleo_penalises_close_neighbours():
    koleo = KoLeoLoss()
    spread = torch.eye(4)
    clumped = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]])
    assert koleo(spread) < koleo(clumped)
    torch.testing.assert_close(koleo(spread), torch.tensor(-math.log(math.sqrt(2))), rtol=1e-5, atol=1e-5)


def test_cosine_schedule_warmup_freeze_and_end():
    schedule = CosineSchedule(base=1.0, final=0.0, total_iters=12, warmup_iters=3, start_warmup=0.1, freeze_iters=2)
    values = [schedule[i] for i in range(14)]
    assert values[:2] == [0.0, 0.0]
    assert values[2:5] == pytest.approx([0.1, 0.55, 1.0])
    assert values[5] == pytest.approx(1.0) and values[5:12] == sorted(values[5:12], reverse=True)
    assert values[12] == values[13] == 0.0


def test_lr_scaling_rules():
    assert scaled_lr(2e-4, 256, "sqrt_wrt_1024") == pytest.approx(1e-4)
    assert scaled_lr(2e-4, 256, "linear_wrt_1024") == pytest.approx(5e-5)


def test_param_groups_layer_decay_patch_embed_and_no_weight_decay():
    key = lambda name: param_group_key(name, "student.backbone.", 4, 0.5, 0.2)  # noqa: E731
    assert key("student.backbone.patch_embed.proj.weight") == (0.5**5 * 0.2, 1.0, False)
    assert key("student.backbone.blocks.3.mlp.fc1.weight") == (0.5, 1.0, False)
    assert key("student.backbone.blocks.0.norm1.weight") == (0.5**4, 0.0, False)
    assert key("student.backbone.blocks.0.ls1.gamma")[1] == 0.0
    assert key("student.backbone.cls_token")[1] == 0.0 and key("student.backbone.pos_embed")[1] == 0.0
    assert key("student.backbone.blocks.1.attn.qkv.bias")[1] == 0.0
    assert key("student.dino_head.last_layer.weight_v") == (1.0, 1.0, True)
    assert key("supervised_head.weight") == (1.0, 1.0, False)
    assert param_group_key("supervised_head.weight", "student.backbone.", 4, 0.5, 0.2, 100.0) == (100.0, 1.0, False)
    assert param_group_key("student.classifier.weight", "student.backbone.", 4, 0.5, 0.2, 100.0) == (1.0, 1.0, False)


def test_meta_arch_optimises_student_and_supervised_head_only():
    cfg = load_config(
        None,
        [
            "student.arch=vit_test",
            "student.patch_size=8",
            "dino.head_n_prototypes=32",
            "ibot.head_n_prototypes=32",
            "dino.head_hidden_dim=16",
            "ibot.head_hidden_dim=16",
            "crops.global_crops_size=32",
        ],
    )
    model = SSLMetaArch(cfg, get_tree("v1"))
    groups = build_param_groups(model, "student.backbone.", model.student.backbone.n_blocks, 1.0, 0.2)
    optimised = {id(p) for g in groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in optimised}
    assert names and all(n.startswith(("student.", "supervised_head.")) for n in names)
    assert model.supervised_head.out_features == len(get_tree("v1").leaves)
    assert {"teacher.backbone.cls_token", "dino_loss.center", "ibot_patch_loss.center"} <= set(model.state_dict())


def test_supervised_loss_falls_on_a_fixed_batch():
    cfg = load_config(
        None,
        [
            "student.arch=vit_test",
            "student.patch_size=8",
            "dino.head_n_prototypes=32",
            "ibot.head_n_prototypes=32",
            "dino.head_hidden_dim=16",
            "ibot.head_hidden_dim=16",
            "crops.global_crops_size=32",
            "crops.local_crops_number=0",
            "train.centering=sinkhorn_knopp",
            "student.drop_path_rate=0",
            "dino.koleo_loss_weight=0",
        ],
    )
    tree = get_tree("v1")
    model = SSLMetaArch(cfg, tree)
    n_patches = 16
    masks = torch.zeros(8, n_patches, dtype=torch.bool)
    masks[:4, :5] = True
    batch = {
        "collated_global_crops": torch.randn(8, 3, 32, 32),
        "collated_masks": masks,
        "n_masked_patches": torch.tensor([int(masks.sum())]),
        "masks_weight": None,
    }
    labels = torch.tensor([tree.index(n) for n in ("neutrophil", "monocyte", "lymphoblast", "eosinophil")])
    supervised = (torch.randn(4, 3, 32, 32), labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(25):
        optimizer.zero_grad()
        loss, terms = model.forward_losses(batch, supervised, teacher_temp=0.04)
        loss.backward()
        optimizer.step()
        model.update_teacher(0.99)
        history.append(terms["supervised"].item())
    assert history[-1] < 0.6 * history[0] and history[-5:] == sorted(history[-5:], reverse=True)


@pytest.mark.parametrize("n_local", [0, 2])
def test_collapsed_dino_values_are_the_dino_terms_of_a_collapsed_head(n_local):
    cfg = load_config(
        None,
        [
            "student.arch=vit_test",
            "student.patch_size=8",
            "dino.head_n_prototypes=32",
            "ibot.head_n_prototypes=32",
            "dino.head_hidden_dim=16",
            "ibot.head_hidden_dim=16",
            "crops.global_crops_size=32",
            "crops.local_crops_size=16",
            f"crops.local_crops_number={n_local}",
            "dino.local_loss=true",
        ],
    )
    model = SSLMetaArch(cfg, get_tree("v1"))
    with torch.no_grad():  # every prototype logit 0: student and teacher outputs are uniform
        for part in (model.student, model.teacher):
            part.dino_head.last_layer.weight_g.zero_()
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[:2, :3] = True
    batch = {
        "collated_global_crops": torch.randn(4, 3, 32, 32),
        "collated_local_crops": torch.randn(2 * n_local, 3, 16, 16),
        "collated_masks": masks,
        "n_masked_patches": torch.tensor([int(masks.sum())]),
        "masks_weight": None,
    }
    _, terms = model.forward_losses(batch, None, teacher_temp=0.04)
    uniform = model.collapsed_dino_values()
    assert set(uniform) == ({"dino_global", "dino_local"} if n_local else {"dino_global"})
    for name, value in uniform.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-5)


def test_distributed_env_from_torchrun_slurm_or_nothing():
    torchrun = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.source) == (3, 4, 1, "torchrun")
    slurm = read_env(
        {
            "SLURM_PROCID": "1",
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "1",
        }
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.source) == (1, 2, 1, "slurm")
    # the batch script itself (no srun step) is a single process even when the job has 2 tasks
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).source == "single"
    assert read_env({}).world_size == 1


def test_pretrained_training_checkpoint_initialises_backbones_and_heads(tmp_path):
    overrides = [
        "student.arch=vit_test",
        "student.patch_size=8",
        "dino.head_n_prototypes=32",
        "ibot.head_n_prototypes=32",
        "dino.head_hidden_dim=16",
        "ibot.head_hidden_dim=16",
        "crops.global_crops_size=32",
        "ibot.separate_head=true",
    ]
    source = SSLMetaArch(load_config(None, overrides), get_tree("v1"))
    torch.save({"model": source.state_dict()}, tmp_path / "run.pth")
    torch.manual_seed(1)
    model = SSLMetaArch(
        load_config(None, [*overrides, f"student.pretrained_weights={tmp_path / 'run.pth'}"]), get_tree("v1")
    )
    for part in ("student", "teacher"):
        for module in ("backbone", "dino_head", "ibot_head"):
            for key, value in getattr(model, part)[module].state_dict().items():
                torch.testing.assert_close(
                    value, source.teacher[module].state_dict()[key], msg=f"{part}.{module}.{key}"
                )
