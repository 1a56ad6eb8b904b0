"""DINO / iBOT prototypes from the start backbone's own features (``dino.head_init=kmeans``), for fine-tuning.

Released backbones ship without DINO/iBOT heads. With random prototypes the teacher's first
targets partition the feature space at random, and matching them pulls a pretrained backbone
away from what it knows. Here each head's prototypes (the rows of ``last_layer.weight_v``) are
the spherical k-means centroids of that head's own bottleneck outputs ``normalize(mlp(x))``,
where ``x`` are the start backbone's CLS tokens (DINO head) or patch tokens (iBOT head; a shared
head gets both, as many patches as CLS tokens) on up to :data:`INIT_IMAGES` training images at
the global crop size, without augmentation (:data:`PATCHES_PER_IMAGE` random patches of each).
The teacher's first targets then assign each crop to a cluster of the start's features.

k-means runs with ``k' = min(K, points // POINTS_PER_CLUSTER, MAX_CLUSTERS)`` clusters, so that
a cluster holds several images and the clustering stays cheap; the ``K`` prototypes take the
``k'`` centroids in turn, each further copy moved by Gaussian noise of norm ~:data:`COPY_NOISE`
and renormalised (identical copies would get identical updates for ever). ``weight_g`` is set
to 1, so a logit is the cosine between the bottleneck output and a prototype. Every rank
computes the same prototypes (seeded); under ``torch.distributed`` rank 0's are broadcast so
that they agree bit for bit.
"""

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dinov2 import distributed
from dinov2.data.manifest import read_manifests
from dinov2.data.transforms import make_eval_transform
from dinov2.errors import ConfigError
from dinov2.eval.features import ImageFiles
from dinov2.layers.dino_head import DINOHead

logger = logging.getLogger("dinov2")

INIT_IMAGES = 2048
PATCHES_PER_IMAGE = 8
POINTS_PER_CLUSTER = 4
MAX_CLUSTERS = 1024
KMEANS_ITERATIONS = 20
COPY_NOISE = 0.1
HEAD_INITS = ("random", "kmeans")


def spherical_kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """``[k, d]`` unit centroids of unit ``points`` ``[n, d]`` (cosine similarity), seeded by k-means++
    (each next seed drawn with probability proportional to its squared distance ``2 - 2 cos`` to the
    nearest seed so far); an emptied cluster restarts at the point least similar to its centroid."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} points, got k={k}")
    seeds = [int(torch.randint(n, (1,), generator=generator))]
    distance = (2 - 2 * points @ points[seeds[0]]).clamp_(min=0)
    for _ in range(k - 1):
        total = float(distance.sum())
        weights = distance if total > 0 else torch.ones(n)  # all points on the seeds: any will do
        seeds.append(int(torch.multinomial(weights, 1, generator=generator)))
        distance = torch.minimum(distance, (2 - 2 * points @ points[seeds[-1]]).clamp_(min=0))
    centroids = points[seeds].clone()
    for _ in range(iterations):
        similarity = points @ centroids.T
        best, assignment = similarity.max(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            sums[empty] = points[best.argsort()[: empty.numel()]]
        centroids = F.normalize(sums, dim=1)
    return centroids


def prototypes_from_points(points: torch.Tensor, n_prototypes: int, generator: torch.Generator) -> torch.Tensor:
    """``[n_prototypes, d]`` unit prototypes: k-means centroids of ``points``, copied with noise (module doc)."""
    points = F.normalize(points.float(), dim=1)
    k = max(1, min(n_prototypes, points.shape[0] // POINTS_PER_CLUSTER, MAX_CLUSTERS))
    centroids = spherical_kmeans(points, k, KMEANS_ITERATIONS, generator)
    prototypes = centroids[torch.arange(n_prototypes) % k]
    if n_prototypes > k:
        noise = torch.randn(prototypes.shape, generator=generator) * (COPY_NOISE / prototypes.shape[1] ** 0.5)
        noise[:k] = 0  # the first copy of every centroid stays exact
        prototypes = F.normalize(prototypes + noise, dim=1)
    return prototypes


@torch.no_grad()
def start_features(backbone, paths, image_size: int, precision, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's CLS tokens ``[n, D]`` and :data:`PATCHES_PER_IMAGE` random patch tokens of each
    image ``[n * PATCHES_PER_IMAGE, D]`` (float32, CPU) of ``paths``."""
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(ImageFiles(paths, make_eval_transform(image_size)), batch_size=32, shuffle=False)
    cls, patches = [], []
    for images, _ in loader:
        with precision.autocast(device):
            out = backbone(images.to(device), is_training=True)
        tokens = out["x_norm_patchtokens"].float().cpu()
        picked = torch.rand(tokens.shape[:2], generator=generator).argsort(dim=1)[:, :PATCHES_PER_IMAGE]
        cls.append(out["x_norm_clstoken"].float().cpu())
        patches.append(tokens[torch.arange(tokens.shape[0])[:, None], picked].flatten(0, 1))
    backbone.train(was_training)
    return torch.cat(cls), torch.cat(patches)


@torch.no_grad()
def head_outputs(head: DINOHead, tokens: torch.Tensor) -> torch.Tensor:
    """The head's bottleneck outputs ``normalize(mlp(tokens))`` in float32 on the CPU."""
    parameter = next(head.parameters())
    return F.normalize(head.mlp(tokens.to(parameter.device, parameter.dtype)).float().cpu(), dim=1)


def set_prototypes(head: DINOHead, prototypes: torch.Tensor) -> None:
    with torch.no_grad():
        head.last_layer.weight_v.copy_(prototypes)
        head.last_layer.weight_g.fill_(1.0)
    if distributed.is_enabled():
        for tensor in (head.last_layer.weight_v, head.last_layer.weight_g):
            torch.distributed.broadcast(tensor.data, src=0)


def init_prototypes_from_start(model, cfg, precision, device) -> None:
    """Set the student's DINO/iBOT prototypes from the start backbone's features (module doc) and
    copy the heads to the teacher. Call before sharding, on every rank."""
    if cfg.dino.head_init not in HEAD_INITS:
        raise ConfigError(f"dino.head_init must be one of {', '.join(HEAD_INITS)}, got {cfg.dino.head_init!r}")
    frame = read_manifests(list(cfg.train.dataset_path_unsup))
    if cfg.train.split is not None:
        frame = frame[frame["split"] == cfg.train.split]
    generator = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(frame), generator=generator)[:INIT_IMAGES].numpy()
    paths = frame["path"].astype(str).to_numpy()[np.sort(order)].tolist()
    cls, patch_rows = start_features(
        model.teacher.backbone, paths, cfg.crops.global_crops_size, precision, device, generator
    )
    student = model.student
    if "ibot_head" in student:
        dino_points = head_outputs(student.dino_head, cls)
        ibot_points = head_outputs(student.ibot_head, patch_rows)
        set_prototypes(student.dino_head, prototypes_from_points(dino_points, cfg.dino.head_n_prototypes, generator))
        set_prototypes(student.ibot_head, prototypes_from_points(ibot_points, cfg.ibot.head_n_prototypes, generator))
    else:
        sampled = patch_rows[torch.randperm(patch_rows.shape[0], generator=generator)[: cls.shape[0]]]
        points = head_outputs(student.dino_head, torch.cat((cls, sampled)))
        set_prototypes(student.dino_head, prototypes_from_points(points, cfg.dino.head_n_prototypes, generator))
    for name in ("dino_head", "ibot_head"):
        if name in student:
            model.teacher[name].load_state_dict(student[name].state_dict())
    logger.info(
        "DINO/iBOT prototypes initialised by k-means of the start backbone's head outputs on %d images", len(paths)
    )
