import json
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, free_port, random_nested

from dinov2.config.custom_hier import get_tree
from dinov2.errors import ConfigError, LabelError
from dinov2.hierarchy import Tree
from dinov2.loss.supcon import HierarchicalSupConLoss, SupConLoss


def reference_supcon(z, classes, tau):
    """SupCon straight from Khosla et al. (L_out), float64 loops over samples: ``(value, has_anchor)``.

    ``classes``: a class per row, None for a row that takes no part. Differentiable in ``z``.
    """
    z = z / z.norm(dim=1, keepdim=True)
    members = [i for i, c in enumerate(classes) if c is not None]
    losses = []
    for i in members:
        positives = [p for p in members if p != i and classes[p] == classes[i]]
        if not positives:
            continue
        others = [a for a in members if a != i]
        log_denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / tau for a in others]), dim=0)
        losses.append(-sum(z[i] @ z[p] / tau - log_denominator for p in positives) / len(positives))
    if not losses:
        return z.sum() * 0.0, False
    return sum(losses) / len(losses), True


def reference_hmlc(tree, z, labels, tau, base=2.0, order="leaves_first"):
    """HMLC "hmce" from Zhang et al. 2022 with the tree's levels (module docstring of dinov2.loss.supcon);
    ``order="root_first"``: levels counted from the root, each clamped to the coarser ones."""
    depth = tree.max_depth
    terms = {}
    for d in range(1, depth + 1):
        classes = []
        for label in labels.tolist():
            name = tree.nodes[label] if label >= 0 else None
            takes_part = name is not None and (tree.is_leaf(name) or tree.depth(name) >= d)
            classes.append(tree.at_level(name, d) if takes_part else None)
        value, has_anchor = reference_supcon(z, classes, tau)
        if has_anchor:
            terms[d] = value
    total, largest = z.sum() * 0.0, None
    if order == "leaves_first":  # from the finest level up: paper level l = depth + 1 - d
        levels = [(d, depth + 1 - d) for d in range(depth, 0, -1)]
    else:  # from the top level down: l = d
        levels = [(d, d) for d in range(1, depth + 1)]
    for d, paper_level in levels:
        if d not in terms:
            continue
        largest = terms[d] if largest is None else torch.maximum(terms[d], largest)
        total = total + base ** (1.0 / paper_level) * largest
    return total / depth


def random_labels(tree, n, generator, ignored=True):
    labels = torch.randint(-1 if ignored else 0, len(tree.nodes), (n,), generator=generator)
    labels[0] = labels[1] = len(tree.leaves) - 1  # a leaf pair
    labels[2] = labels[3] = len(tree.nodes) - 1  # an internal node pair
    return labels


def random_features(n, generator, dim=5):
    return torch.randn(n, dim, generator=generator, dtype=torch.float64).requires_grad_()


def value_and_grad(loss, features, labels):
    value = loss(features, labels)
    (grad,) = torch.autograd.grad(value, features)
    return value.detach(), grad


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau, base", [(0.07, 2.0), (0.5, 2.0), (0.1, 1.0)])
@pytest.mark.parametrize("order", ["leaves_first", "root_first"])
def test_hier_supcon_matches_the_formula_on_random_trees(seed, tau, base, order):
    tree = Tree.from_nested(random_nested(random.Random(seed)))
    generator = torch.Generator().manual_seed(seed)
    features, labels = random_features(14, generator), random_labels(tree, 14, generator)
    loss = HierarchicalSupConLoss(tree, temperature=tau, level_penalty=base, level_order=order)
    value, grad = value_and_grad(loss, features, labels)
    reference = lambda f, y: reference_hmlc(tree, f, y, tau, base, order)  # noqa: E731
    expected, expected_grad = value_and_grad(reference, features, labels)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)
    value32 = loss(features.detach().float(), labels)
    assert value32.dtype == torch.float32 and value32.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_supcon_matches_the_formula_with_leaf_labels(seed):
    tree = Tree.from_nested(random_nested(random.Random(seed)))
    generator = torch.Generator().manual_seed(seed)
    features = random_features(12, generator)
    labels = torch.randint(-1, len(tree.leaves), (12,), generator=generator)
    labels[:2] = 0
    value, grad = value_and_grad(SupConLoss(tree), features, labels)
    classes = [None if y < 0 else y for y in labels.tolist()]
    expected, expected_grad = value_and_grad(lambda f, _: reference_supcon(f, classes, 0.07)[0], features, labels)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)


def test_hier_supcon_finest_level_is_supcon_on_the_leaves():
    """With penalty 1 and a batch that has anchors only at the leaf level of a one-level tree, both losses agree."""
    tree = Tree.from_nested({"a": None, "b": None, "c": None})
    generator = torch.Generator().manual_seed(0)
    features, labels = random_features(9, generator), torch.tensor([0, 0, 1, 1, 1, 2, 2, -1, 0])
    hier = HierarchicalSupConLoss(tree, level_penalty=1.0)(features, labels)
    torch.testing.assert_close(hier, SupConLoss(tree)(features, labels))


def test_an_internal_label_takes_part_only_at_the_levels_it_reaches():
    """Two samples labelled at a lineage are positives at level 1 only; at the finer levels they are
    absent (neither positives nor negatives), so the loss equals that of the batch without them
    there: changing their features changes only the level-1 term."""
    tree = get_tree("v1")
    lineage = tree.index("lymphopoiesis")
    leaf = tree.index("lymphoblast")
    loss = HierarchicalSupConLoss(tree, level_penalty=1.0)
    generator = torch.Generator().manual_seed(1)
    features = random_features(6, generator)
    labels = torch.tensor([lineage, lineage, leaf, leaf, tree.index("monocyte"), tree.index("monocyte")])
    # levels 2..4: only the four leaf samples take part
    total = loss(features, labels)
    leaf_rows = features[2:]
    finer = []
    for d in range(2, tree.max_depth + 1):
        classes = [tree.at_level(tree.nodes[y], d) for y in labels[2:].tolist()]
        finer.append(reference_supcon(leaf_rows, classes, 0.07)[0])
    level1 = reference_supcon(features, [tree.at_level(tree.nodes[y], 1) for y in labels.tolist()], 0.07)[0]
    clamped, running = [], None
    for value in reversed([level1] + finer):
        running = value if running is None else torch.maximum(value, running)
        clamped.append(running)
    torch.testing.assert_close(total, sum(clamped) / tree.max_depth)


@pytest.mark.parametrize("loss_class", [SupConLoss, HierarchicalSupConLoss])
def test_batches_without_a_positive_pair_give_zero_without_nan(loss_class):
    tree = get_tree("v1")
    features = torch.randn(len(tree.leaves), 8, dtype=torch.float64, requires_grad=True)
    unique = torch.arange(len(tree.leaves))  # all different leaves: positives at coarse levels only
    single = torch.tensor([0, -1, -1])  # one labelled sample: no pair at all
    empty = torch.full((4,), -1)
    batches = [(features[:3], single), (features[:4], empty), (features[:0], unique[:0])]
    if loss_class is SupConLoss:
        batches.append((features, unique))
    for rows, labels in batches:
        value = loss_class(tree)(rows, labels)
        (grad,) = torch.autograd.grad(value, features, allow_unused=True)
        assert value.item() == 0.0
        assert grad is None or (torch.isfinite(grad).all() and not grad.any())


def test_all_unique_leaves_contrast_only_the_coarser_levels():
    tree = get_tree("v1")
    generator = torch.Generator().manual_seed(3)
    features = random_features(len(tree.leaves), generator, dim=16)
    labels = torch.arange(len(tree.leaves))
    value, grad = value_and_grad(HierarchicalSupConLoss(tree), features, labels)
    expected, expected_grad = value_and_grad(lambda f, y: reference_hmlc(tree, f, y, 0.07), features, labels)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)
    assert value > 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss_class", [SupConLoss, HierarchicalSupConLoss])
def test_single_class_batch(loss_class):
    """Every sample the same leaf: all others are positives. With identical features each level's term
    is log(N - 1) (all logits equal); spreading the features apart raises the loss."""
    tree = get_tree("v1")
    n = 8
    labels = torch.full((n,), tree.index("neutrophil_band"))
    value = loss_class(tree)(torch.ones(n, 4, dtype=torch.float64), labels)
    level_weight_sum = (
        HierarchicalSupConLoss(tree).level_weights.sum().item() if loss_class is HierarchicalSupConLoss else 1
    )
    assert value.item() == pytest.approx(level_weight_sum * math.log(n - 1), rel=1e-12)
    assert loss_class(tree)(torch.randn(n, 4, dtype=torch.float64), labels) > value


def test_clamp_makes_a_coarser_level_cost_at_least_a_finer_one():
    """Two lineages of two leaves, two samples per leaf (penalty 1, so HMLC = (C_1 + C_2) / 2)."""
    tree = Tree.from_nested({"x": ["x1", "x2"], "y": ["y1", "y2"]})
    names = ("x1", "x1", "x2", "x2", "y1", "y1", "y2", "y2")
    labels = torch.tensor([tree.index(n) for n in names])
    loss = HierarchicalSupConLoss(tree, level_penalty=1.0)

    def top_and_leaf_terms(points):
        features = torch.tensor(points, dtype=torch.float64)
        top = reference_supcon(features, [tree.at_level(n, 1) for n in names], 0.07)[0]
        return features, top.item(), reference_supcon(features, names, 0.07)[0].item()

    # leaves apart, x1 near y1 and x2 near y2 (lineages mixed): the top term is the larger, no clamp
    features, top, leaf = top_and_leaf_terms([[1, 0]] * 2 + [[0, 1]] * 2 + [[0.9, 0.1]] * 2 + [[0.1, 0.9]] * 2)
    assert leaf < top
    assert loss(features, labels).item() == pytest.approx((top + leaf) / 2, rel=1e-12)
    # each x1 sample far from its twin but near the x2 samples (y mirrored): same-leaf positives are
    # farther than same-lineage ones, so the top term is the smaller; the clamp lifts it to the leaf term
    points = [[1, 0], [0, 1], [1, 1], [1, 1], [-1, 0], [0, -1], [-1, -1], [-1, -1]]
    features, top, leaf = top_and_leaf_terms(points)
    assert top < leaf
    assert loss(features, labels).item() == pytest.approx(leaf, rel=1e-12)
    # counted from the root, the leaf level is clamped to the top one instead: here no clamp
    root_first = HierarchicalSupConLoss(tree, level_penalty=1.0, level_order="root_first")
    assert root_first(features, labels).item() == pytest.approx((top + leaf) / 2, rel=1e-12)


def test_level_weights_follow_the_published_penalty():
    tree = get_tree("v1")
    weights = HierarchicalSupConLoss(tree).level_weights * tree.max_depth
    # level d from the root is the published l = D + 1 - d: the leaf level weighs 2, the top 2^(1/4)
    assert weights.tolist() == pytest.approx([2**0.25, 2 ** (1 / 3), 2**0.5, 2.0])


def test_half_precision_and_autocast_compute_in_float32():
    tree = get_tree("v1")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 8, generator=generator)
    labels = torch.randint(0, len(tree.leaves), (16,), generator=generator)
    loss = HierarchicalSupConLoss(tree)
    reference = loss(features, labels)
    value = loss(features.bfloat16(), labels)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(reference.item(), rel=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(features, labels).item() == pytest.approx(reference.item(), rel=1e-6)


def test_a_small_temperature_computes_in_float64_so_nothing_underflows():
    """τ = 0.01, the first anchor opposite to every other sample: each term of its denominator is
    exp(-2/τ) = exp(-200) of the largest possible, zero in float32; the loss computes in float64."""
    tree = Tree.from_nested({"a": None, "b": None})
    features = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.01], [-1.0, -0.01]])
    labels = torch.tensor([0, 0, 1, 1])
    value = SupConLoss(tree, temperature=0.01)(features, labels)
    expected = reference_supcon(features.double(), labels.tolist(), 0.01)[0]
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_inputs_raise_errors_that_name_the_culprit():
    tree = get_tree("v1")
    features = torch.randn(3, 4)
    with pytest.raises(LabelError, match="internal node.*lymphopoiesis.*hier_supcon"):
        SupConLoss(tree)(features, torch.tensor([0, 1, tree.index("lymphopoiesis")]))
    for loss in (SupConLoss(tree), HierarchicalSupConLoss(tree)):
        with pytest.raises(LabelError, match=r"\[-5, 999\] out of range"):
            loss(features, torch.tensor([-5, 1, 999]))
    with pytest.raises(ConfigError, match="do not fit"):
        SupConLoss(tree)(features, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="temperature must be >= 0.003"):
        SupConLoss(tree, temperature=0.0)
    with pytest.raises(ConfigError, match="level_penalty"):
        HierarchicalSupConLoss(tree, level_penalty=-1.0)


# ---------------------------------------------------------------------------------------- two ranks


def _batch():
    tree = get_tree("v1")
    generator = torch.Generator().manual_seed(5)
    labels = random_labels(tree, 11, generator)
    inputs = torch.randn(11, 6, generator=generator, dtype=torch.float64)
    projection = torch.nn.Linear(6, 4, dtype=torch.float64)
    for parameter in projection.parameters():  # the same on every rank, as under DDP / FSDP
        torch.nn.init.normal_(parameter, generator=generator)
    return tree, inputs, labels, projection


def _run(rows: slice) -> dict:
    """Value and projection weight gradient of each loss on ``rows`` of the batch (SupCon: leaf labels)."""
    tree, inputs, labels, projection = _batch()
    out = {}
    for name, loss, targets in [
        ("supcon", SupConLoss(tree), labels.remainder(len(tree.leaves))),
        ("hier_supcon", HierarchicalSupConLoss(tree), labels),
    ]:
        projection.zero_grad()
        value = loss(projection(inputs[rows]), targets[rows])
        value.backward()
        out[name] = (value.detach(), projection.weight.grad.clone())
    return out


SPLITS = {"6+5 rows": ((0, 6), (6, 11)), "0+11 rows": ((0, 0), (0, 11))}


def _rank(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = {}
        for split, bounds in SPLITS.items():
            for name, (value, grad) in _run(slice(*bounds[rank])).items():
                dist.all_reduce(grad)  # what the trainer does with gradients: their mean over ranks
                out[split, name] = (value, grad / 2)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_give_the_loss_and_gradient_of_one_process_with_the_whole_batch(monkeypatch):
    """Rows split unevenly, or all on one rank: every rank's value, and the ranks' mean gradient of
    the layer before the loss, equal one process's on all 11 rows."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), results), nprocs=2, join=True)
        per_rank = [results[0], results[1]]
    whole = _run(slice(0, 11))
    for (split, name), _ in per_rank[0].items():
        value, grad = whole[name]
        assert value > 0
        for part in per_rank:
            torch.testing.assert_close(part[split, name][0], value, rtol=1e-12, atol=1e-12, msg=f"{split} {name}")
            torch.testing.assert_close(part[split, name][1], grad, rtol=1e-10, atol=1e-12, msg=f"{split} {name}")


def test_bench_supcon_times_the_losses_against_the_naive_one():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_supcon.py"), "--batch-sizes", "16", "--repeats", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert row["batch"] == 16 and row["hier_supcon_ms"] > 0 and row["hier_naive_vs_hier_supcon"] > 0
