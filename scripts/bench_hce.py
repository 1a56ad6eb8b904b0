"""Benchmark hierarchical cross-entropy: forward + backward time of dino_hier's exact HCE.

Side by side in one run, interleaved so machine load hits all alike (median of repeats):
``hce`` (dinov2.loss.hierarchical_ce), ``naive`` (the straightforward per-edge version: leaf
softmax, B × depth × leaves masks for each edge's child and parent, log of their ratio; the shape of
the reference implementation, which skips underflowed terms) and ``flat_ce`` (F.cross_entropy, a
lower bound). Trees: ``v1`` (26 leaves) and a generated 10,000-leaf tree. Prints one JSON line per
(tree, batch size) and the ratios.

    python scripts/bench_hce.py [--batch-sizes 64 256 1024] [--repeats 7] [--threads 1]
"""

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dinov2.config.custom_hier import get_tree
from dinov2.hierarchy import Tree
from dinov2.loss.hierarchical_ce import HierarchicalCrossEntropyLoss
from dinov2.utils.cli import run_cli


def generated_tree(num_leaves: int, seed: int = 0) -> Tree:
    """A random tree with ``num_leaves`` leaves: 4 levels of 3–12 children, unequal leaf depths."""
    rng = random.Random(seed)
    counter = iter(range(10**9))

    def grow(budget: int, depth: int):
        if budget <= 12 or depth == 4:
            return [f"leaf{next(counter)}" for _ in range(budget)]
        parts = rng.randint(3, 12)
        cuts = sorted(rng.sample(range(1, budget), parts - 1))
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [budget])]
        return {f"node{next(counter)}": (grow(size, depth + 1) if size > 1 else None) for size in sizes}

    return Tree.from_nested(grow(num_leaves, 0))


class NaiveHCE:
    """Per-edge HCE from dense B × depth × leaves masks (memory grows with B·depth·leaves)."""

    def __init__(self, tree: Tree, alpha: float = 0.5):
        membership = tree.membership().float()
        depth = tree.max_depth
        nodes = len(tree.nodes)
        self.child = torch.zeros(nodes, depth, len(tree.leaves))
        self.parent = torch.ones(nodes, depth, len(tree.leaves))
        self.weight = torch.zeros(nodes, depth)
        total = 1.0 + float(torch.exp(-alpha * torch.tensor(tree.node_depths, dtype=torch.float64)).sum())
        for n, name in enumerate(tree.nodes):
            path = (name,) + tree.ancestors(name)
            for j, node in enumerate(path):
                self.child[n, j] = membership[tree.index(node)]
                if j + 1 < len(path):
                    self.parent[n, j] = membership[tree.index(path[j + 1])]
                self.weight[n, j] = torch.exp(torch.tensor(-alpha * tree.depth(node))) / total

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob = F.softmax(logits, dim=1)[:, None, :]
        child = (prob * self.child[target]).sum(-1)
        parent = (prob * self.parent[target]).sum(-1)
        kept = child > 0
        ratio = torch.where(kept, child / parent.clamp(min=1e-38), torch.ones_like(child))
        return -(self.weight[target] * ratio.log()).sum(1).mean()


def time_step(loss: Callable, logits: torch.Tensor, target: torch.Tensor, min_seconds: float = 0.05) -> float:
    """Seconds per forward + backward, averaged over a run of at least ``min_seconds``."""
    steps, start = 0, time.perf_counter()
    while True:
        logits.grad = None
        loss(logits, target).backward()
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / steps


def bench(tree_name: str, tree: Tree, batch: int, repeats: int, with_naive: bool) -> dict:
    generator = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, len(tree.leaves), generator=generator).requires_grad_()
    target = torch.randint(0, len(tree.nodes), (batch,), generator=generator)
    leaf_target = target % len(tree.leaves)
    losses = {"hce": (HierarchicalCrossEntropyLoss(tree), target), "flat_ce": (F.cross_entropy, leaf_target)}
    if with_naive:
        losses["naive"] = (NaiveHCE(tree), target)
    for loss, labels in losses.values():
        time_step(loss, logits, labels, min_seconds=0.02)  # warm-up
    times = {name: [] for name in losses}
    for _ in range(repeats):
        for name, (loss, labels) in losses.items():
            times[name].append(time_step(loss, logits, labels))
    ms = {name: round(statistics.median(values) * 1e3, 4) for name, values in times.items()}
    row = {"tree": tree_name, "leaves": len(tree.leaves), "batch": batch, **{f"{k}_ms": v for k, v in ms.items()}}
    row["hce_vs_flat_ce"] = round(ms["hce"] / ms["flat_ce"], 2)
    if with_naive:
        row["naive_vs_hce"] = round(ms["naive"] / ms["hce"], 2)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024], help="batch sizes to time")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--big-leaves", type=int, default=10_000, help="leaves of the generated large tree")
    parser.add_argument(
        "--naive-limit",
        type=int,
        default=2**26,
        help="skip the naive loss when B x depth x leaves exceeds this (its memory)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trees = {"v1": get_tree("v1"), f"generated_{args.big_leaves}": generated_tree(args.big_leaves)}
    for name, tree in trees.items():
        for batch in args.batch_sizes:
            with_naive = batch * tree.max_depth * len(tree.leaves) <= args.naive_limit
            print(json.dumps(bench(name, tree, batch, args.repeats, with_naive)), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
