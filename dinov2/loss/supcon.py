"""Supervised contrastive losses over a :class:`~dinov2.hierarchy.Tree`: SupCon and hierarchical SupCon.

Features ``f`` (one row per sample) are L2-normalised to ``z``; ``s_ij = z_i · z_j / τ``. Labels
index ``tree.nodes`` (-1: ignored, the sample takes no part at all).

**SupCon** (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020, the ``L_out`` form).
Over a set ``S`` of samples with a class each, an *anchor* is a sample ``i`` with at least one
positive ``P(i) = {p ∈ S, p ≠ i, class(p) = class(i)}``, and

    ℓ_i = log Σ_{a ∈ S, a ≠ i} exp(s_ia) − (1 / |P(i)|) Σ_{p ∈ P(i)} s_ip,
    SupCon(S) = mean of ℓ_i over the anchors (0, and no term, when there is none).

:class:`SupConLoss` takes the leaves as classes; labels must be leaves (like flat cross-entropy).
Samples without a positive in the batch add nothing (the published code divides 0 by 0 there).

**Hierarchical SupCon** (Zhang et al., "Use All The Labels: A Hierarchical Multi-Label Contrastive
Learning Framework", CVPR 2022, the "hmce" loss of github.com/salesforce/hierarchicalContrastiveLearning,
``losses/losses.py``: ``HMLC(loss_type="hmce")``). One SupCon term per level of the tree, then a
penalty per level and the hierarchy constraint. Level ``d = 1 .. D`` (``D = tree.max_depth``) is
the depth counted from the root; at level ``d`` a sample's class is its ancestor-or-self at depth
``d``. A sample labelled at an internal node of depth ``k`` takes part at levels ``d ≤ k`` only (its
label says nothing finer); a leaf takes part at every level (below its depth it is its own class),
so level ``D`` is SupCon over the leaves. ``S_d`` = the samples taking part at level ``d``: they are
the positives *and* negatives of that level's term ``T_d = SupCon(S_d)``.

The published code counts its levels from the finest: with label columns ``[category, product,
variation, image]`` its level ``l = 1`` compares samples sharing everything but the image
(the finest class) and ``l = L − 1`` those sharing the category. Here that is ``l = D + 1 − d``:

    λ_l = b^(1/l)                                         (b = ``level_penalty``, 2 published)
    C_d = max(T_d, T_{d+1}, ..., T_D)                     ("max_loss_lower_layer": a coarser level
                                                            never costs less than a finer one)
    HMLC = (1 / D) Σ_{d with an anchor} λ_{D+1−d} · C_d

so the finest level weighs ``b`` and the top level ``b^(1/D)``; the maximum runs over the levels
that have an anchor. This order (``level_order="leaves_first"``, the default) follows the published
code and the paper's constraint that pairs farther apart in the tree never cost less than closer
pairs. Adaptations that count ``l`` from the root (dino_hier's reading, ``level_order="root_first"``)
weigh the top level most and clamp each level to the coarser ones:

    λ_d = b^(1/d),   C_d = max(T_1, ..., T_d),   HMLC = (1 / D) Σ_{d with an anchor} λ_d · C_d.

Deliberate differences from the published code: it divides by the number of
label columns (``D + 1`` here, the image column counted) where this uses the number of levels ``D``
(the paper's ``1/|L|``); it keeps one sample per finer class when moving up a level (an order-
dependent subsample; here every sample takes part at every level its label reaches, as in the
paper's formula); and it averages over every anchor (NaN when one has no positive). Two views per
image are not assumed: give both views as rows with the same label if there are two.

Computation (:class:`_TreeSupCon`): exact, in log space, no loop over samples. The per-node tables
(each node's class at each level) are built once; a step costs two ``N × N × dim`` matrix products
(similarities forward, their gradient backward) and ``O(N · levels · dim)`` for the rest: the
positives' similarities are summed through per-class feature sums. The loss computes in float32, or
float64 for float64 features and for ``τ < FLOAT32_MIN_TEMPERATURE`` (autocast is off inside).

**Several ranks** (DDP / FSDP): the features and labels of every rank form the batch (rows in rank
order, uneven batch sizes allowed). Every rank computes the loss of that whole batch, the same value
as one process holding it; gradients flow to the local rows only. The trainer averages gradients
over ranks, so the local rows' gradient is scaled by the world size: the average is then the
whole-batch gradient, as in one process.
"""

import math

import torch
import torch.distributed as dist
from torch import nn

from dinov2.errors import ConfigError, LabelError
from dinov2.hierarchy import Tree

TEMPERATURE = 0.07
"""τ of both papers."""
LEVEL_PENALTY = 2.0
"""``b`` of ``λ_l = b^(1/l)``, the published ``pow_2`` penalty."""
FLOAT32_MIN_TEMPERATURE = 0.025
"""Below it the loss computes in float64: ``exp(−2/τ)`` must stay a normal float32 (``2/τ ≤ 80``)."""
MIN_TEMPERATURE = 0.003
"""The same bound for float64 (``2/τ ≤ 667``)."""
LEVEL_ORDERS = ("leaves_first", "root_first")
"""hier_supcon's level numbering: the published HMLC's (finest first), or from the root."""
NORM_EPS = 1e-12
"""Features are divided by ``max(|f|, NORM_EPS)``, as ``F.normalize`` does."""


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gather_batch(features: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1) -> tuple:
    """``(features, labels)`` of all ranks, in rank order; the identity in a single process.

    Gradients reach this rank's rows only, multiplied by the world size (module docstring). Ranks
    may hold different numbers of rows: they are padded to the largest with ``ignore_index`` labels.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([features.shape[0]], device=features.device))
    padded = max(int(size) for size in sizes)
    extra = padded - features.shape[0]
    local = torch.cat([features.detach(), features.new_zeros(extra, *features.shape[1:])])
    local_labels = torch.cat([labels, labels.new_full((extra,), ignore_index)])
    all_features = [torch.empty_like(local) for _ in range(world)]
    all_labels = [torch.empty_like(local_labels) for _ in range(world)]
    dist.all_gather(all_features, local.contiguous())
    dist.all_gather(all_labels, local_labels.contiguous())
    own = _ScaleGradient.apply(features, float(world))
    all_features[rank] = torch.cat([own, features.new_zeros(extra, *features.shape[1:])])
    return torch.cat(all_features), torch.cat(all_labels)


class _TreeSupCon(torch.autograd.Function):
    """The loss of :class:`TreeSupConLoss` from features ``f`` and level keys, forward and backward by hand.

    ``z = f / max(|f|, NORM_EPS)`` (as ``F.normalize``). ``keys[i, l]`` names the class of sample ``i`` at
    level ``l`` (-1: no part at that level); ``member[i, l] = keys[i, l] >= 0``.

    Denominators: with ``s_ij = z_i · z_j / τ ≤ 1/τ``, the terms ``E_ij = exp(s_ij − 1/τ)`` (``E_ii = 0``)
    lie in ``[exp(−2/τ), 1]``, above the dtype's smallest normal number (the caller picks the dtype),
    so none underflows: ``log Z_il = log Σ_j E_ij member_jl + 1/τ`` is exact up to rounding. A row
    with no member at a level (never an anchor there) gets a finite value and no gradient.

    Positives, over the ``n_g ≥ 2`` members of a class ``g`` (each with ``n_g − 1`` positives), from
    the class sums ``C_g = Σ_{i ∈ g} z_i`` and ``Q_g = Σ_{i ∈ g} |z_i|²``:
    ``Σ_{i ∈ g} (1 / (n_g − 1)) Σ_{p ∈ g, p ≠ i} s_ip = (|C_g|² − Q_g) / (τ (n_g − 1))``.

    Loss: ``Σ_l coef_l · T_l``, where ``coef_l`` collects the weights ``w_d`` of the levels ``d`` (with an
    anchor) whose running maximum ``C_d`` is ``T_l``. Backward, with ``a_il`` the gradient on
    ``log Z_il`` and ``b_g`` the one on ``|C_g|² − Q_g``: ``E`` is symmetric, so with
    ``R = (a / Z) @ memberᵀ``, ``∂/∂z_j = ((E ⊙ (R + Rᵀ)) @ z)_j / τ + 2 Σ_l b_{g(j,l)} (C_{g(j,l)} − z_j)``,
    then ``∂/∂f = (∂/∂z − z (z · ∂/∂z)) / |f|``. Cost: two ``N × N × dim`` products, the rest
    ``O(N · L · dim)``.
    """

    @staticmethod
    def forward(ctx, features, keys, level_weights, temperature):
        n, levels = keys.shape
        norm = features.norm(dim=1, keepdim=True).clamp_(min=NORM_EPS)
        z = features / norm
        top = 1.0 / temperature
        member = keys >= 0
        members = member.to(z.dtype)
        weights = torch.addmm(z.new_tensor(-top), z, z.T, alpha=top).exp_()
        weights.fill_diagonal_(0.0)
        partition = (weights @ members).clamp_(min=torch.finfo(z.dtype).tiny)
        # one group per key present (a (level, class) pair), and one (key -1) for the non-members
        groups, group = torch.unique(keys.flatten(), return_inverse=True)
        size = torch.bincount(group, minlength=len(groups))
        class_sums = z.new_zeros(len(groups), z.shape[1]).index_add_(0, group, z.repeat_interleave(levels, dim=0))
        squares = z.new_zeros(len(groups)).index_add_(0, group, (z * z).sum(dim=1).repeat_interleave(levels))
        has_positives = (groups >= 0) & (size >= 2)
        group_level = groups.remainder(levels)
        pairs = (size - 1).clamp(min=1).to(z.dtype) * temperature  # τ (n_g − 1)
        positive = ((class_sums * class_sums).sum(dim=1) - squares) / pairs * has_positives
        anchor = has_positives[group].view(n, levels)
        n_anchor = anchor.sum(dim=0)
        has_anchor = n_anchor > 0
        n_anchor = n_anchor.clamp(min=1).to(z.dtype)
        log_partition = ((partition.log() + top) * anchor).sum(dim=0)
        terms = (log_partition - z.new_zeros(levels).index_add_(0, group_level, positive)) / n_anchor
        # C_d = max of T over the levels d..L-1 (finer) that have an anchor: a running max from the last level
        running = terms.masked_fill(~has_anchor, -math.inf).flip(0).cummax(dim=0).indices.flip(0)
        coef = z.new_zeros(levels).index_add_(0, levels - 1 - running, level_weights * has_anchor)
        ctx.save_for_backward(z, norm, weights, members, partition, anchor, group, class_sums, has_positives)
        ctx.extra = (group_level, pairs, coef / n_anchor, top)
        return (coef * terms).sum()

    @staticmethod
    def backward(ctx, grad):
        z, norm, weights, members, partition, anchor, group, class_sums, has_positives = ctx.saved_tensors
        group_level, pairs, scale, top = ctx.extra
        n, levels = anchor.shape
        scale = grad * scale  # ∂loss/∂(Σ_i anchor_il log Z_il) = −∂loss/∂(positive sum at level l)
        on_partition = anchor * scale / partition  # a / Z
        ratio = torch.cat([on_partition, members], dim=1) @ torch.cat([members, on_partition], dim=1).T  # R + Rᵀ
        grad_z = ratio.mul_(weights) @ z * top
        on_class = -scale[group_level] / pairs * has_positives  # b_g
        per_sample = (on_class[:, None] * class_sums).index_select(0, group).view(n, levels, z.shape[1]).sum(dim=1)
        grad_z += 2 * (per_sample - z * on_class[group].view(n, levels).sum(dim=1, keepdim=True))
        radial = torch.where(norm > NORM_EPS, (z * grad_z).sum(dim=1, keepdim=True), 0.0)
        grad_features = (grad_z - z * radial) / norm
        return grad_features, None, None, None


class TreeSupConLoss(nn.Module):
    """SupCon terms at the levels of a tree, clamped and weighted: the common part of both losses.

    ``level_keys[node, l]``: the class of a sample labelled ``node`` at level ``l`` as a key
    ``class · L + l`` (-1: no part at that level); a last row (all -1) for ignored samples. Level
    ``l``'s term has weight ``level_weights[l]`` and is clamped to at least the terms of the levels
    after it.
    """

    def __init__(self, tree: Tree, level_keys, level_weights, temperature: float, ignore_index: int) -> None:
        super().__init__()
        if not temperature >= MIN_TEMPERATURE:
            raise ConfigError(f"contrastive loss temperature must be >= {MIN_TEMPERATURE}, got {temperature}")
        self.tree, self.temperature, self.ignore_index = tree, float(temperature), ignore_index
        self.register_buffer("level_keys", torch.as_tensor(level_keys, dtype=torch.long), persistent=False)
        self.register_buffer("level_weights", torch.as_tensor(level_weights, dtype=torch.float64), persistent=False)

    def check_inputs(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """ConfigError for shapes that do not fit, LabelError naming labels outside the tree."""
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ConfigError(
                f"contrastive loss: features of shape {tuple(features.shape)} and labels of shape "
                f"{tuple(labels.shape)} do not fit: expected [batch, dim] and [batch]"
            )
        num_nodes = len(self.tree.nodes)
        if labels.numel() == 0 or 0 <= int(labels.min()) and int(labels.max()) < num_nodes:
            return
        bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= num_nodes))
        if bad.any():
            values = sorted(set(labels[bad].tolist()))
            raise LabelError(
                f"label index(es) {values[:10]} out of range for the nodes of the tree: expected "
                f"0..{num_nodes - 1} or {self.ignore_index} (ignored)"
            )

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the batch of all ranks (module docstring); ``labels`` index ``tree.nodes``."""
        self.check_inputs(features, labels)
        features, labels = gather_batch(features, labels, self.ignore_index)
        keys = self.level_keys.index_select(0, torch.where(labels == self.ignore_index, len(self.tree.nodes), labels))
        exact = features.dtype == torch.float64 or self.temperature < FLOAT32_MIN_TEMPERATURE
        with torch.autocast(features.device.type, enabled=False):
            x = features.to(torch.float64 if exact else torch.float32)
            loss = _TreeSupCon.apply(x, keys, self.level_weights.to(x.dtype), self.temperature)
        return loss if features.dtype == torch.float64 else loss.float()


class SupConLoss(TreeSupConLoss):
    """SupCon with the leaves as classes (module docstring); labels must be leaves or ``ignore_index``.

    Args:
        tree: the hierarchy; labels index ``tree.nodes``.
        temperature: τ (at least ``MIN_TEMPERATURE``).
        ignore_index: label of samples left out.
    """

    def __init__(self, tree: Tree, temperature: float = TEMPERATURE, ignore_index: int = -1) -> None:
        keys = [[leaf] for leaf in range(len(tree.leaves))] + [[-1]] * (len(tree.internal_nodes) + 1)
        super().__init__(tree, keys, [1.0], temperature, ignore_index)

    def check_inputs(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """As in :class:`TreeSupConLoss`, and a LabelError for internal-node labels."""
        super().check_inputs(features, labels)
        internal = labels >= len(self.tree.leaves)
        if internal.any():
            names = sorted({self.tree.nodes[i] for i in labels[internal].tolist()})
            raise LabelError(
                f"SupCon needs leaf labels, got internal node(s) {names}; use loss 'hier_supcon' "
                "or map these labels to None in DATASETS"
            )

    def extra_repr(self) -> str:
        return f"leaves={len(self.tree.leaves)}, temperature={self.temperature}, ignore_index={self.ignore_index}"


class HierarchicalSupConLoss(TreeSupConLoss):
    """Hierarchical multi-label SupCon, HMLC "hmce" (formula in the module docstring).

    Args:
        tree: the hierarchy; labels index ``tree.nodes`` (leaves or internal nodes).
        temperature: τ of every level's SupCon term (at least ``MIN_TEMPERATURE``).
        level_penalty: ``b`` of the level weights ``λ_l = b^(1/l)``; 1 weighs all levels alike.
        level_order: ``leaves_first`` (published: ``l = 1`` the finest level, each level clamped to
            the finer ones) or ``root_first`` (``l = 1`` the top level, each clamped to the coarser ones).
        ignore_index: label of samples left out.
    """

    def __init__(
        self,
        tree: Tree,
        temperature: float = TEMPERATURE,
        level_penalty: float = LEVEL_PENALTY,
        level_order: str = "leaves_first",
        ignore_index: int = -1,
    ) -> None:
        if not level_penalty > 0:
            raise ConfigError(f"hierarchical SupCon level_penalty must be > 0, got {level_penalty}")
        if level_order not in LEVEL_ORDERS:
            raise ConfigError(
                f"hierarchical SupCon level_order must be one of {', '.join(LEVEL_ORDERS)}, got {level_order!r}"
            )
        depth = tree.max_depth
        # column l: the ancestor-or-self at depth d of a node that reaches it, with l = d - 1 (coarsest
        # first) or, root_first, l = D - d (finest first: "the levels after it" are then the coarser ones)
        root_first = level_order == "root_first"
        keys = [[-1] * depth for _ in range(len(tree.nodes) + 1)]
        for n, name in enumerate(tree.nodes):
            reach = depth if tree.is_leaf(name) else tree.depth(name)
            for d in range(1, reach + 1):
                column = depth - d if root_first else d - 1
                keys[n][column] = tree.index(tree.at_level(name, d)) * depth + column
        # the weight b^(1/l) of column l's depth d, l = d from the root or D + 1 - d from the leaves
        depths = range(depth, 0, -1) if root_first else range(1, depth + 1)
        weights = [level_penalty ** (1.0 / (d if root_first else depth + 1 - d)) / depth for d in depths]
        super().__init__(tree, keys, weights, temperature, ignore_index)
        self.level_penalty, self.level_order = float(level_penalty), level_order

    def extra_repr(self) -> str:
        return (
            f"levels={self.tree.max_depth}, temperature={self.temperature}, "
            f"level_penalty={self.level_penalty}, level_order={self.level_order}, ignore_index={self.ignore_index}"
        )


CONTRASTIVE_LOSSES = ("supcon", "hier_supcon")


def build_contrastive_loss(
    tree: Tree,
    loss: str,
    temperature: float = TEMPERATURE,
    level_penalty: float = LEVEL_PENALTY,
    level_order: str = "leaves_first",
) -> TreeSupConLoss:
    """``"supcon"`` (leaves as classes) or ``"hier_supcon"`` (HMLC over the tree's levels)."""
    if loss == "supcon":
        return SupConLoss(tree, temperature=temperature)
    if loss == "hier_supcon":
        return HierarchicalSupConLoss(tree, temperature, level_penalty, level_order)
    raise ConfigError(f"unknown contrastive loss {loss!r}; choose one of {', '.join(CONTRASTIVE_LOSSES)}")
