"""Benchmark the contrastive losses: forward + backward time of SupCon and hierarchical SupCon (HMLC).

Side by side in one run, interleaved so machine load hits all alike (median of repeats), on the
``v1`` tree with random labels (leaves and internal nodes) and random features:

* ``hier_supcon`` / ``supcon``: dinov2.loss.supcon;
* ``hier_dense``: the same losses with per-level ``[levels, N, N]`` masks and a masked
  ``logsumexp`` per level (the direct vectorised version);
* ``hier_naive``: the shape of the published HMLC code: per level, a Python loop over the samples
  builds the positive mask, then a SupCon with a max-shifted softmax.

All three compute the same value (checked). Each time is the wall time per step and the CPU time of
the calling thread (less sensitive to other processes on a shared machine; equal to the work done
only with ``--threads 1``). Prints one JSON line per batch size.

    python scripts/bench_supcon.py [--batch-sizes 64 256 1024] [--dim 128] [--repeats 7] [--threads 1]
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dinov2.config.custom_hier import get_tree
from dinov2.hierarchy import Tree
from dinov2.loss.supcon import HierarchicalSupConLoss, SupConLoss
from dinov2.utils.cli import run_cli


def level_classes(tree: Tree, labels: torch.Tensor) -> torch.Tensor:
    """``[levels, N]`` class of each sample at each depth (-1: it takes no part), as HMLC defines them."""
    keys = HierarchicalSupConLoss(tree).level_keys[torch.where(labels < 0, len(tree.nodes), labels)].T
    return torch.where(keys >= 0, keys.div(tree.max_depth, rounding_mode="floor"), -1)


def combine(terms: list, has_anchor: list, penalty: float = 2.0) -> torch.Tensor:
    """HMLC from the per-level terms (coarsest first): clamp from the finest level up, weight, average."""
    depth, total, largest = len(terms), terms[0].new_zeros(()), None
    for d in range(depth - 1, -1, -1):
        if has_anchor[d]:
            largest = terms[d] if largest is None else torch.maximum(terms[d], largest)
            total = total + penalty ** (1.0 / (depth - d)) * largest
    return total / depth


def dense_hmlc(features: torch.Tensor, classes: torch.Tensor, tau: float) -> torch.Tensor:
    z = F.normalize(features, dim=1)
    similarity = z @ z.T / tau
    member = classes >= 0
    not_self = ~torch.eye(len(z), dtype=torch.bool)
    pair = member[:, :, None] & member[:, None, :] & not_self
    positive = pair & (classes[:, :, None] == classes[:, None, :])
    log_denominator = torch.logsumexp(similarity.masked_fill(~pair, torch.finfo(z.dtype).min), dim=2)
    n_positive = positive.sum(dim=2)
    anchor = n_positive > 0
    per_anchor = (log_denominator - (similarity * positive).sum(dim=2) / n_positive.clamp(min=1)) * anchor
    terms = per_anchor.sum(dim=1) / anchor.sum(dim=1).clamp(min=1)
    return combine(list(terms), anchor.any(dim=1).tolist())


def naive_supcon(features: torch.Tensor, positive: torch.Tensor, member: torch.Tensor, tau: float):
    z = F.normalize(features[member], dim=1)
    positive = positive[member][:, member].float()
    logits = z @ z.T / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    others = 1.0 - torch.eye(len(z))
    positive = positive * others
    log_prob = logits - torch.log((logits.exp() * others).sum(dim=1, keepdim=True))
    n_positive = positive.sum(dim=1)
    anchor = n_positive > 0
    if not anchor.any():
        return features.sum() * 0.0, False
    return -((positive * log_prob).sum(dim=1)[anchor] / n_positive[anchor]).mean(), True


def naive_hmlc(features: torch.Tensor, classes: torch.Tensor, tau: float) -> torch.Tensor:
    terms, has_anchor = [], []
    for level in classes:
        positive = torch.stack([level == level[i] for i in range(len(level))])  # one row per sample
        term, anchored = naive_supcon(features, positive, level >= 0, tau)
        terms.append(term)
        has_anchor.append(anchored)
    return combine(terms, has_anchor)


def time_step(loss: Callable, features: torch.Tensor, labels: torch.Tensor, min_seconds: float) -> tuple:
    """(wall seconds, this thread's CPU seconds) per forward + backward, over at least ``min_seconds``."""
    steps, wall, cpu = 0, time.perf_counter(), time.thread_time()
    while True:
        features.grad = None
        loss(features, labels).backward()
        steps += 1
        elapsed = time.perf_counter() - wall
        if elapsed >= min_seconds:
            return elapsed / steps, (time.thread_time() - cpu) / steps


def bench(tree: Tree, batch: int, dim: int, repeats: int, with_naive: bool) -> dict:
    generator = torch.Generator().manual_seed(batch)
    features = torch.randn(batch, dim, generator=generator).requires_grad_()
    labels = torch.randint(0, len(tree.nodes), (batch,), generator=generator)
    classes = level_classes(tree, labels)
    losses = {
        "hier_supcon": (HierarchicalSupConLoss(tree), labels),
        "supcon": (SupConLoss(tree), labels % len(tree.leaves)),
        "hier_dense": (lambda f, c: dense_hmlc(f, c, 0.07), classes),
    }
    if with_naive:
        losses["hier_naive"] = (lambda f, c: naive_hmlc(f, c, 0.07), classes)
    with torch.no_grad():
        values = {name: float(loss(features, target)) for name, (loss, target) in losses.items()}
    for name in ("hier_dense", "hier_naive"):
        if name in values and abs(values[name] - values["hier_supcon"]) > 1e-4 * abs(values["hier_supcon"]):
            raise AssertionError(f"{name} gives {values[name]}, hier_supcon {values['hier_supcon']}")
    for loss, target in losses.values():
        time_step(loss, features, target, min_seconds=0.02)  # warm-up
    times = {name: [] for name in losses}
    for _ in range(repeats):
        for name, (loss, target) in losses.items():
            times[name].append(time_step(loss, features, target, min_seconds=0.05))
    row = {"tree": "v1", "batch": batch, "dim": dim, "threads": torch.get_num_threads()}
    for name, pairs in times.items():
        row[f"{name}_ms"] = round(statistics.median(wall for wall, _ in pairs) * 1e3, 3)
        row[f"{name}_cpu_ms"] = round(statistics.median(cpu for _, cpu in pairs) * 1e3, 3)
    for name in ("hier_dense", "hier_naive"):
        if name in times:
            row[f"{name}_vs_hier_supcon"] = round(row[f"{name}_ms"] / row["hier_supcon_ms"], 1)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024], help="batch sizes to time")
    parser.add_argument("--dim", type=int, default=128, help="feature (projection) width")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--naive-limit", type=int, default=256, help="largest batch timed with the naive loss (slow)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tree = get_tree("v1")
    for batch in args.batch_sizes:
        print(json.dumps(bench(tree, batch, args.dim, args.repeats, batch <= args.naive_limit)), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
