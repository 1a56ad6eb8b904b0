import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import random_nested

from dinov2.config.custom_hier import get_tree, resolve_label
from dinov2.errors import ConfigError, LabelError
from dinov2.hierarchy import ROOT, Tree
from dinov2.loss.hierarchical_ce import FlatCrossEntropyLoss, HierarchicalCrossEntropyLoss, build_supervised_loss


def reference_hce(tree, logits, targets, alpha=0.5, weighting="exponential", normalize=True):
    """HCE straight from its definition, in float64 Python loops (mean over labels != -1)."""

    def leaves_below(node):
        kids = tree.children(node)
        return [node] if not kids else [leaf for kid in kids for leaf in leaves_below(kid)]

    def log_sum_exp(values):
        top = max(values)
        return top + math.log(math.fsum(math.exp(v - top) for v in values))

    def weight(node):
        return math.exp(-alpha * tree.depth(node)) if weighting == "exponential" else 1.0

    total = sum(weight(node) for node in tree.nodes) + weight(ROOT) if normalize else 1.0
    losses = []
    for row, target in zip(logits.tolist(), targets.tolist()):
        if target == -1:
            continue
        logit = dict(zip(tree.leaves, row))
        log_partition = log_sum_exp(row)

        def log_p(node, logit=logit, log_partition=log_partition):
            return 0.0 if node == ROOT else log_sum_exp([logit[leaf] for leaf in leaves_below(node)]) - log_partition

        loss, node = 0.0, tree.nodes[target]
        while node != ROOT:
            parent = tree.parent(node)
            loss += weight(node) / total * (log_p(parent) - log_p(node))
            node = parent
        losses.append(loss)
    return sum(losses) / max(len(losses), 1)


def random_batch(tree, batch, generator, scale=3.0):
    logits = torch.randn(batch, len(tree.leaves), generator=generator, dtype=torch.float64) * scale
    target = torch.randint(-1, len(tree.nodes), (batch,), generator=generator)
    target[0] = len(tree.leaves) - 1  # a leaf
    target[1] = len(tree.nodes) - 1  # an internal node
    return logits, target


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weighting, normalize", [("exponential", True), ("exponential", False), ("uniform", True)])
def test_matches_definition_on_random_trees(seed, alpha, weighting, normalize):
    tree = Tree.from_nested(random_nested(random.Random(seed)))
    generator = torch.Generator().manual_seed(seed)
    logits, target = random_batch(tree, 12, generator)
    loss = HierarchicalCrossEntropyLoss(tree, alpha=alpha, weighting=weighting, normalize=normalize)
    expected = reference_hce(tree, logits, target, alpha, weighting, normalize)
    assert loss(logits, target).item() == pytest.approx(expected, abs=1e-6, rel=1e-6)
    assert loss(logits.float(), target).item() == pytest.approx(expected, abs=1e-4, rel=1e-4)


def test_every_label_of_a_random_tree():
    tree = Tree.from_nested(random_nested(random.Random(7)))
    target = torch.arange(len(tree.nodes))
    logits = torch.randn(len(target), len(tree.leaves), dtype=torch.float64)
    loss = HierarchicalCrossEntropyLoss(tree, alpha=0.5)
    assert loss(logits, target).item() == pytest.approx(reference_hce(tree, logits, target), abs=1e-6)


def test_uniform_unnormalised_is_flat_cross_entropy_on_leaves_and_minus_log_p_on_nodes():
    tree = get_tree("v1")
    logits = torch.randn(32, len(tree.leaves), dtype=torch.float64)
    loss = HierarchicalCrossEntropyLoss(tree, weighting="uniform", normalize=False)
    leaf_target = torch.randint(0, len(tree.leaves), (32,))
    assert loss(logits, leaf_target).item() == pytest.approx(F.cross_entropy(logits, leaf_target).item(), abs=1e-9)
    node = "granulocytic_immature"  # leaves at depths 3 and 4 (reference defect 1)
    start, stop = tree.leaf_ranges[tree.index(node)]
    expected = -torch.logsumexp(F.log_softmax(logits, 1)[:, start:stop], 1).mean()
    assert loss(logits, torch.full((32,), tree.index(node))).item() == pytest.approx(expected.item(), abs=1e-9)


def test_internal_label_with_leaves_at_different_depths():
    tree = get_tree("v1")
    node = tree.index("granulocytic_immature")
    assert len({tree.depth(leaf) for leaf in tree.leaves_under("granulocytic_immature")}) == 2
    logits = torch.randn(8, len(tree.leaves), dtype=torch.float64)
    target = torch.full((8,), node)
    loss = HierarchicalCrossEntropyLoss(tree)(logits, target).item()
    assert loss == pytest.approx(reference_hce(tree, logits, target), abs=1e-9)


def test_class_order_follows_the_tree():
    tree = get_tree("v1")
    target = torch.tensor([resolve_label(tree, "acevedo", "BA"), resolve_label(tree, "matek_2019", "PMB")])
    logits = torch.full((2, len(tree.leaves)), -20.0)
    logits[0, tree.leaves.index("basophil")] = 20.0
    logits[1, tree.leaves.index("promyelocyte_bilobed")] = 20.0
    assert HierarchicalCrossEntropyLoss(tree)(logits, target).item() < 1e-6
    assert HierarchicalCrossEntropyLoss(tree)(logits, target.flip(0)).item() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_stay_finite_and_exact(dtype):
    tree = get_tree("v1")
    logits = torch.zeros(4, len(tree.leaves), dtype=dtype)
    logits[:, tree.leaves.index("lymphoblast")] = 1e4  # confident ...
    logits[:, tree.leaves.index("basophil")] = -1e4
    target = torch.tensor(
        [tree.index("neutrophil_band"), tree.index("basophil"), tree.index("lymphoblast"), tree.index("granulopoiesis")]
    )
    logits.requires_grad_()
    loss = HierarchicalCrossEntropyLoss(tree)(logits, target)
    loss.backward()
    expected = reference_hce(tree, logits.detach().double(), target)
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # ... and wrong: the loss is about w(lineage) * 1e4 per wrong sample, never skipped to 0 (reference defect 3)
    single = HierarchicalCrossEntropyLoss(tree)(logits.detach()[:1], target[:1]).item()
    total_weight = 1 + sum(math.exp(-0.5 * d) for d in tree.node_depths)
    assert single > 0.99 * math.exp(-0.5) / total_weight * 1e4


def test_a_label_far_below_the_prediction_is_exact_in_float32():
    tree = get_tree("v1")
    logits = torch.zeros(2, len(tree.leaves))
    logits[0, 0] = 100.0  # P(label) ~ e^-100 (below float32's range) for a label away from leaf 0
    target = torch.tensor([tree.index("platelet"), 3])
    exact = HierarchicalCrossEntropyLoss(tree)(logits, target).item()
    assert exact == pytest.approx(reference_hce(tree, logits.double(), target), rel=1e-6)


def test_underflowing_probability_is_not_dropped():
    tree = Tree.from_nested({"a": ["a1", "a2"], "b": ["b1"]})
    logits = torch.tensor([[0.0, 0.0, -120.0]])  # P(b) ~ 1e-52 underflows float32 probabilities
    loss = HierarchicalCrossEntropyLoss(tree, weighting="uniform", normalize=False)
    assert loss(logits, torch.tensor([tree.index("b")])).item() == pytest.approx(120.0 + math.log(2), rel=1e-6)
    assert loss(logits, torch.tensor([tree.index("b1")])).item() == pytest.approx(120.0 + math.log(2), rel=1e-6)


@pytest.mark.parametrize("scale", [3.0, 40.0])
def test_gradcheck(scale):
    tree = Tree.from_nested(random_nested(random.Random(3)))
    logits, target = random_batch(tree, 6, torch.Generator().manual_seed(0), scale)
    loss = HierarchicalCrossEntropyLoss(tree, alpha=0.7)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))


def test_ignored_samples_and_all_ignored_batch():
    tree = get_tree("v1")
    loss = HierarchicalCrossEntropyLoss(tree)
    logits = torch.randn(4, len(tree.leaves), dtype=torch.float64)
    logits[1] = 1e30
    target = torch.tensor([3, -1, 30, -1])
    kept = torch.tensor([0, 2])
    assert loss(logits, target).item() == pytest.approx(loss(logits[kept], target[kept]).item(), abs=1e-12)
    logits = torch.randn(3, len(tree.leaves), requires_grad=True)
    empty = loss(logits, torch.full((3,), -1))
    empty.backward()
    assert empty.item() == 0.0 and empty.requires_grad
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("bad", ["number of nodes", 1000, -2])
def test_out_of_range_labels_are_an_error(bad):
    tree = get_tree("v1")
    bad = len(tree.nodes) if bad == "number of nodes" else bad
    logits = torch.randn(2, len(tree.leaves))
    with pytest.raises(LabelError, match=f"\\[{bad}\\] out of range"):
        HierarchicalCrossEntropyLoss(tree)(logits, torch.tensor([0, bad]))
    with pytest.raises(LabelError, match=f"{bad}"):
        FlatCrossEntropyLoss(tree)(logits, torch.tensor([0, bad]))


def test_other_ignore_index():
    tree = get_tree("v1")
    loss = HierarchicalCrossEntropyLoss(tree, ignore_index=-100)
    logits = torch.randn(3, len(tree.leaves), dtype=torch.float64)
    assert loss(logits, torch.tensor([1, -100, 2])).item() == pytest.approx(
        reference_hce(tree, logits, torch.tensor([1, -1, 2])), abs=1e-9
    )
    with pytest.raises(LabelError, match="-1"):
        loss(logits, torch.tensor([1, -1, 2]))


def test_logits_must_fit_the_tree():
    tree = get_tree("v1")
    with pytest.raises(ConfigError, match="one logit per leaf"):
        HierarchicalCrossEntropyLoss(tree)(torch.randn(2, len(tree.leaves) - 1), torch.tensor([0, 1]))


def test_flat_cross_entropy_rejects_internal_labels():
    tree = get_tree("v1")
    flat = FlatCrossEntropyLoss(tree)
    logits = torch.randn(4, len(tree.leaves))
    target = torch.tensor([0, 5, -1, len(tree.leaves) - 1])
    expected = F.cross_entropy(logits, target, ignore_index=-1)
    assert flat(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(LabelError, match="'neutrophil'"):
        flat(logits, torch.tensor([0, tree.index("neutrophil")]))
    empty = flat(logits.requires_grad_(), torch.full((4,), -1))
    assert empty.item() == 0.0 and empty.requires_grad


def test_build_supervised_loss():
    tree = get_tree("v1")
    hce = build_supervised_loss(tree, "hce", alpha=1.0)
    assert isinstance(hce, HierarchicalCrossEntropyLoss) and hce.alpha == 1.0 and hce.normalize
    assert isinstance(build_supervised_loss(tree, "ce"), FlatCrossEntropyLoss)
    with pytest.raises(ConfigError, match="'focal'"):
        build_supervised_loss(tree, "focal")
    with pytest.raises(ConfigError, match="weighting"):
        HierarchicalCrossEntropyLoss(tree, weighting="linear")


def test_autocast_bf16_computes_in_float32():
    tree = get_tree("v1")
    loss = HierarchicalCrossEntropyLoss(tree)
    logits = torch.randn(16, len(tree.leaves)).bfloat16()
    target = torch.randint(0, len(tree.nodes), (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, target)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference_hce(tree, logits.double(), target), rel=1e-5)


def test_large_tree_matches_definition():
    nested = {f"g{i}": {f"s{i}_{j}": [f"l{i}_{j}_{k}" for k in range(40)] for j in range(10)} for i in range(8)}
    tree = Tree.from_nested(nested)  # 3,200 leaves
    loss = HierarchicalCrossEntropyLoss(tree)
    logits = torch.randn(4, len(tree.leaves), dtype=torch.float64)
    target = torch.tensor([0, len(tree.leaves) + 3, len(tree.nodes) - 1, -1])
    assert loss(logits, target).item() == pytest.approx(reference_hce(tree, logits, target), abs=1e-6)


@pytest.mark.parametrize("nested", [{"a": None, "b": None, "c": None}, {"a": {"b": {"c": ["x", "y"]}}}])
def test_flat_tree_and_single_child_chain(nested):
    tree = Tree.from_nested(nested)
    logits = torch.randn(5, len(tree.leaves), dtype=torch.float64)
    target = torch.arange(5) % len(tree.nodes)
    loss = HierarchicalCrossEntropyLoss(tree, alpha=0.5)
    assert loss(logits, target).item() == pytest.approx(reference_hce(tree, logits, target), abs=1e-9)
