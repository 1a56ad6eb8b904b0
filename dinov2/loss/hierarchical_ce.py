"""Hierarchical cross-entropy (HCE) over a :class:`~dinov2.hierarchy.Tree`, and the flat baseline.

Logits ``z`` follow ``tree.leaves``; a label is a node index into ``tree.nodes`` (leaf or internal)
or -1 (ignored). With leaf probabilities ``p = softmax(z)`` and ``P(m) = Σ_{leaf l under m} p_l``
(``P(root) = 1``), a sample labelled at node ``n`` costs

    HCE(z, n) = Σ_{c on the path n → root, c ≠ root} w(c) · (log P(parent(c)) − log P(c))

(Bertinetto et al., "Making Better Mistakes", 2020). ``log P(m)`` is a log-sum-exp of the leaf
log-softmax, so a vanishing probability gives a large finite term instead of an underflow.

Weights: ``weighting="exponential"``: ``w(c) = exp(−α·depth(c))`` (root depth 0); with
``normalize=True`` divided by ``Σ_m exp(−α·depth(m))`` over all nodes m *including the root*.
``weighting="uniform"``: ``w = 1`` (normalised: divided by the number of nodes plus one).
Unnormalised uniform HCE telescopes to ``−log P(n)``: flat cross-entropy for a leaf label.

Computation: memory O(B·leaves + nodes·depth) and a fixed number of tensor operations whatever the
tree. The path n = p_0 ⊂ p_1 ⊂ ... ⊂ p_{k-1} ⊂ p_D = root of a label (D = max depth; levels past
the top-level node repeat the root) covers nested contiguous leaf ranges (leaves are in depth-first
order), so each leaf falls in one *ring* j: under p_j but not p_{j-1}. Then

    U_J = log Σ_{l under p_J} exp(z_l) = log of the cumulative sum over rings j ≤ J of their mass,
    log P(p_J) = U_J − U_D,

and the path sum telescopes to ``Σ_J coef[n, J] · U_J`` with ``coef[n, J] = w(p_{J-1}) − w(p_J)``
(``w(p_{-1}) = 0``) and ``coef[n, D] = −Σ`` of the others: a dot product with a precomputed
table. Ring masses are taken relative to each ring's own largest logit and summed with
``logcumsumexp``, so nothing underflows to a dropped term, even for a label astronomically less
likely than the prediction (e.g. logits of ±1e4; see ``_WeightedPathLogPartition``). The ring of
every (label, leaf) is counted per batch from the path's range bounds (a cumulative sum of +1 at
each range start and −1 at each stop).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dinov2.errors import ConfigError, LabelError
from dinov2.hierarchy import Tree

EXP_FLOOR = -80.0
"""Exponents are clamped here: each term enters a sum of at least 1 (its ring's largest term), so the
change (< e^-80 relative per leaf) is below rounding, and exp of smaller arguments would be subnormal
in fp32."""
WEIGHTINGS = ("exponential", "uniform")
LOSSES = ("hce", "ce")


def _check_logits(logits: torch.Tensor, tree: Tree) -> None:
    if logits.ndim != 2 or logits.shape[1] != len(tree.leaves):
        raise ConfigError(
            f"logits of shape {tuple(logits.shape)} do not fit the tree: expected "
            f"[batch, {len(tree.leaves)}] (one logit per leaf)"
        )


def _kept_samples(target: torch.Tensor, ignore_index: int, num_labels: int, what: str):
    """``(mask of kept samples or None when all are kept, number kept)``.

    LabelError when a kept label is outside ``[0, num_labels)``. One reduction in the common case.
    """
    if target.numel() == 0:
        return None, 0
    low, high = (int(v) for v in torch.aminmax(target.detach()))
    if 0 <= low and high < num_labels:
        return None, target.numel()
    kept = target != ignore_index
    bad = kept & ((target < 0) | (target >= num_labels))
    if bad.any():
        values = sorted(set(target[bad].tolist()))
        raise LabelError(
            f"label index(es) {values[:10]} out of range for {what}: expected 0..{num_labels - 1} "
            f"or {ignore_index} (ignored)"
        )
    return kept, int(kept.sum())


class _WeightedPathLogPartition(torch.autograd.Function):
    """``scale · Σ_{b,J} coef[b, J] · U[b, J]``, ``U_J = log Σ_{leaf l under p_J} exp(z_l)`` (module docstring).

    With per-ring maxima ``t_j`` and ring masses ``T_j = Σ_{l in ring j} exp(z_l − t_j)`` (at least 1
    for a non-empty ring), ``U_J = logcumsumexp_J(log T_j + t_j)``. Rows of ``coef`` sum to 0, so any
    per-sample shift of U cancels. Gradient, for leaf l in ring r: ``∂/∂z_l = Σ_{J≥r} coef_J
    exp(z_l − U_J) = exp(z_l − t_r) · Σ_{J≥r} coef_J exp(t_r − U_J)``, every exponent ≤ 0. One
    autograd node keeps the cost to a few operations (and leaves empty rings, log 0, out of the
    gradient).
    """

    @staticmethod
    def forward(ctx, logits, ring, coef, at_or_below, scale):
        batch, levels = coef.shape
        ctx.scale = scale
        top = logits.new_full((batch, levels), torch.finfo(logits.dtype).min)
        top = top.scatter_reduce(1, ring, logits, "amax")  # t_j (lowest for an empty ring)
        scaled = (logits - top.gather(1, ring)).clamp(min=EXP_FLOOR).exp()  # exp(z_l − t_ring(l))
        ring_total = scaled.new_zeros(batch, levels).scatter_add(1, ring, scaled)  # T_j (0 if empty)
        log_partition = torch.logcumsumexp(ring_total.log() + top, dim=1)  # U_J
        ctx.save_for_backward(scaled, ring, coef, at_or_below.to(logits.dtype), top, log_partition)
        return torch.dot(log_partition.flatten(), coef.flatten()) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        scaled, ring, coef, at_or_below, top, log_partition = ctx.saved_tensors
        decay = (top[:, :, None] - log_partition[:, None, :]).clamp(EXP_FLOOR, 0).exp() * at_or_below.T
        per_ring = torch.bmm(decay, coef[:, :, None])[:, :, 0]  # Σ_{J≥r} coef_J exp(t_r − U_J)
        return scaled * per_ring.gather(1, ring) * (grad * ctx.scale), None, None, None, None


class HierarchicalCrossEntropyLoss(nn.Module):
    """Exact HCE (formula in the module docstring); ``forward`` returns the mean over non-ignored samples.

    Args:
        tree: the hierarchy; logits follow ``tree.leaves``, labels index ``tree.nodes``.
        alpha: decay of the exponential edge weights with depth.
        weighting: ``"exponential"`` or ``"uniform"``.
        normalize: divide the weights by their sum over all nodes including the root.
        ignore_index: label of samples left out of the loss.

    Half-precision logits (e.g. under ``torch.autocast``) are promoted to float32; float64 stays float64.
    """

    def __init__(
        self,
        tree: Tree,
        alpha: float = 0.5,
        weighting: str = "exponential",
        normalize: bool = True,
        ignore_index: int = -1,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown HCE weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.tree, self.alpha, self.weighting, self.normalize = tree, float(alpha), weighting, normalize
        self.ignore_index = ignore_index

        def weight(depth: int) -> float:
            return math.exp(-self.alpha * depth) if weighting == "exponential" else 1.0

        total = sum(weight(int(d)) for d in tree.node_depths) + weight(0)  # + the root
        scale = 1.0 / total if normalize else 1.0
        num_nodes, num_leaves, depth = len(tree.nodes), len(tree.leaves), tree.max_depth
        # One row per label plus a last row for ignored samples (whose path is the root alone).
        # Levels past the top-level node stand for the root: range [0, num_leaves), coef 0.
        starts = torch.zeros(num_nodes + 1, depth, dtype=torch.long)  # ascending: p_{k-1}, ..., p_0
        stops = torch.full((num_nodes + 1, depth), num_leaves, dtype=torch.long)  # ascending: p_0, ..., p_{k-1}
        coef = torch.zeros(num_nodes + 1, depth + 1, dtype=torch.float64)  # last column: U_D, see docstring
        for n, name in enumerate(tree.nodes):
            path = (name,) + tree.ancestors(name)
            for j, node in enumerate(path):
                start, stop = tree.leaf_ranges[tree.index(node)].tolist()
                starts[n, depth - 1 - j], stops[n, j] = start, stop
                below = weight(tree.depth(path[j - 1])) if j else 0.0
                coef[n, j] = (below - weight(tree.depth(node))) * scale
        coef[:, depth] = -coef.sum(dim=1)
        self.register_buffer("path_starts", starts, persistent=False)
        self.register_buffer("path_stops", stops, persistent=False)
        self.register_buffer("path_coef", coef, persistent=False)
        self.register_buffer("path_coef32", coef.float(), persistent=False)
        self.register_buffer("plus_one", torch.ones(1, depth, dtype=torch.long), persistent=False)
        self.register_buffer("minus_one", -torch.ones(1, depth, dtype=torch.long), persistent=False)
        # at_or_below[J, j] = 1 when ring j lies under p_J (j <= J), else 0
        self.register_buffer("at_or_below", torch.ones(depth + 1, depth + 1).tril(), persistent=False)

    def _rings(self, label: torch.Tensor) -> torch.Tensor:
        """``[B, leaves]`` ring of each leaf for each label: 0 under p_0, j under p_j only, D outside the path."""
        # count of path ranges [start, stop) holding each leaf: cumulative sum of +1 at starts, -1 at stops
        batch, num_leaves = len(label), len(self.tree.leaves)
        edges = torch.zeros(batch, num_leaves + 1, dtype=torch.long, device=label.device)
        edges.scatter_add_(1, self.path_starts.index_select(0, label), self.plus_one.expand(batch, -1))
        edges.scatter_add_(1, self.path_stops.index_select(0, label), self.minus_one.expand(batch, -1))
        inside = edges[:, :num_leaves].cumsum(dim=1)
        return self.path_starts.shape[1] - inside

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, self.tree)
        num_nodes = len(self.tree.nodes)
        kept, count = _kept_samples(target, self.ignore_index, num_nodes, "the nodes of the tree")
        with torch.autocast(logits.device.type, enabled=False):
            x = logits if logits.dtype == torch.float64 else logits.float()
            label = target if kept is None else torch.where(kept, target, num_nodes)
            table = self.path_coef if x.dtype == torch.float64 else self.path_coef32
            coef = table.index_select(0, label).to(x.dtype)
            return _WeightedPathLogPartition.apply(x, self._rings(label), coef, self.at_or_below, 1.0 / max(count, 1))

    def extra_repr(self) -> str:
        return (
            f"leaves={len(self.tree.leaves)}, nodes={len(self.tree.nodes)}, alpha={self.alpha}, "
            f"weighting={self.weighting!r}, normalize={self.normalize}, ignore_index={self.ignore_index}"
        )


class FlatCrossEntropyLoss(nn.Module):
    """Flat cross-entropy over the leaves (the baseline); mean over non-ignored samples.

    Only leaf labels (indices ``0 .. len(tree.leaves) - 1``) are accepted: a sample labelled at an
    internal node has no single target class, so it raises LabelError rather than being silently
    dropped; map such labels to None in ``DATASETS`` (or train with HCE) to use the data anyway.
    """

    def __init__(self, tree: Tree, ignore_index: int = -1) -> None:
        super().__init__()
        self.tree, self.ignore_index = tree, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, self.tree)
        num_leaves = len(self.tree.leaves)
        kept = target != self.ignore_index
        internal = kept & (target >= num_leaves) & (target < len(self.tree.nodes))
        if internal.any():
            names = sorted({self.tree.nodes[i] for i in target[internal].tolist()})
            raise LabelError(
                f"flat cross-entropy needs leaf labels, got internal node(s) {names}; use loss 'hce' "
                "or map these labels to None in DATASETS"
            )
        _, count = _kept_samples(target, self.ignore_index, num_leaves, "the leaves of the tree")
        with torch.autocast(logits.device.type, enabled=False):
            x = logits if logits.dtype == torch.float64 else logits.float()
            return F.cross_entropy(x, target, ignore_index=self.ignore_index, reduction="sum") / max(count, 1)

    def extra_repr(self) -> str:
        return f"leaves={len(self.tree.leaves)}, ignore_index={self.ignore_index}"


def build_supervised_loss(tree: Tree, loss: str = "hce", alpha: float = 0.5) -> nn.Module:
    """The supervised loss of a run: ``"hce"`` (exponential, normalised, with ``alpha``) or flat ``"ce"``."""
    if loss == "hce":
        return HierarchicalCrossEntropyLoss(tree, alpha=alpha)
    if loss == "ce":
        return FlatCrossEntropyLoss(tree)
    raise ConfigError(f"unknown supervised loss {loss!r}; choose one of {', '.join(LOSSES)}")
