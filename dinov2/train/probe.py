"""A linear probe during training (``train.probe_manifest``): is fine-tuning improving the backbone or
wrecking it?

At the start of a run, at every periodic export (``train.eval_period_iterations``) and at the end,
the teacher backbone's CLS features of the manifest's labelled ``train`` and ``test`` rows are extracted at the
export's image size, logistic regression (the evaluation's protocol, :func:`logreg_predict`) is
fitted on the train rows and scored on the test rows. The record (``probe/logreg_accuracy``,
``probe/logreg_balanced_accuracy``; a prediction is correct when it is the label or lies under it)
goes to ``training_metrics.jsonl``. Keep the manifest small: the other ranks wait.
"""

import numpy as np

from dinov2.config.custom_hier import IGNORED
from dinov2.data.manifest import read_manifests, resolve_manifest_labels
from dinov2.data.transforms import make_eval_transform
from dinov2.errors import DataError
from dinov2.eval import metrics
from dinov2.eval.features import extract_features
from dinov2.eval.protocols import logreg_predict
from dinov2.models import build_backbone
from dinov2.train.ssl_meta_arch import backbone_kwargs


class LinearProbe:
    """Logistic regression on a backbone's CLS features: fitted on a manifest's train rows, scored on its test rows."""

    def __init__(self, cfg, tree):
        manifest = cfg.train.probe_manifest
        frame = read_manifests([manifest])
        labels = resolve_manifest_labels(frame, tree)
        keep = (labels != IGNORED) & frame["split"].isin(["train", "test"]).to_numpy()
        self.frame, self.labels = frame[keep].reset_index(drop=True), labels[keep]
        self.train = (self.frame["split"] == "train").to_numpy()
        if not self.train.any() or self.train.all():
            raise DataError(f"train.probe_manifest={manifest} needs labelled rows with split train and with split test")
        self.tree = tree
        self.transform = make_eval_transform(cfg.supervised.image_size or cfg.crops.global_crops_size)
        self.paths = self.frame["path"].astype(str).tolist()
        self.backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, 0.0))

    def __call__(self, backbone_state: dict, precision, device) -> dict:
        """``{"probe/logreg_accuracy", "probe/logreg_balanced_accuracy", "probe/n_test"}`` of the
        backbone with the (full) state dict ``backbone_state``."""
        self.backbone.load_state_dict(backbone_state)
        features, _ = extract_features(
            self.backbone, self.paths, self.transform, bf16=precision.name != "fp32", desc="probe", device=device
        )
        predicted = logreg_predict(features[self.train], self.labels[self.train], features[~self.train])
        truth = self.labels[~self.train]
        return {
            "probe/logreg_accuracy": float(np.mean(metrics.is_correct(truth, predicted, self.tree))),
            "probe/logreg_balanced_accuracy": metrics.balanced_accuracy(truth, predicted, self.tree),
            "probe/n_test": int(truth.size),
        }
