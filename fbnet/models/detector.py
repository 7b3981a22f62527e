"""Foreground detectors behind one interface: canvases in, at most J scored boxes out.

F-Net scans the boxes a detector finds (the paper: Faster R-CNN, at most J=9 boxes with
confidence >= 0.1). Every detector here is a :class:`Detector`: ``forward(images)`` takes
``(N, 3, S, S)`` canvases in [0, 1] and returns fixed-size ``boxes (N, J, 4)`` in canvas pixels
and ``scores (N, J)`` (0 where fewer than J boxes pass the threshold), a form that batches and
exports.

This is the base module, as torchvision's ``models/detection`` has one: the interface, the
factory :func:`build_detector`, :func:`detect` and :func:`finetune`. Each detector lives in its
own module, which imports this one; this one finds them through the registry
(:data:`fbnet.models.registry.DETECTORS`, imported on use):

* ``fasterrcnn``, ``fasterrcnn_light``: :mod:`fbnet.models.fasterrcnn` (torchvision's ResNet-50
  FPN model; the same architecture on a small trunk that fine-tunes on a dataset's boxes in
  minutes on a CPU);
* ``yolov3_tiny``: :mod:`fbnet.models.yolo` (YOLOv3-tiny from Darknet ``.cfg`` + ``.weights``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import DetectorConfig
from .registry import DETECTORS, resolve


class Detector(nn.Module):
    """Interface: ``forward(images) -> (boxes (N, J, 4), scores (N, J))``.

    A detector implements ``detections(image)``: for one ``(3, S, S)`` canvas, every kept box
    ``(P, 4)`` and score ``(P,)`` after non-maximum suppression, sorted by decreasing score.
    ``forward`` and the exported graph (``fbnet.export.graphs.DetectorGraph``) both build on it.
    :meth:`from_config` builds one from ``model.detector``; :meth:`finetune` trains it on a
    dataset's boxes where it can be; ``trunk`` is its convolutional body when it has one that
    ``backbone: detector`` can reuse (else None).
    """

    max_boxes: int
    score_threshold: float
    trunk: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: DetectorConfig, num_classes: int, image_size: int) -> Detector:
        """The detector ``cfg.name`` for a dataset of ``num_classes`` box classes and ``S = image_size``."""
        raise NotImplementedError

    def detections(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def finetune(self, images: np.ndarray, boxes: list[list[list[float]]], cfg: DetectorConfig,
                 seed: int = 0) -> list[dict]:
        """Train on canvases ``(N, 3, S, S)`` and per-image ``[x1, y1, x2, y2, cls]`` boxes; returns
        per-epoch losses."""
        raise NotImplementedError(f"{type(self).__name__} cannot be fine-tuned here; give model.detector.weights")

    def forward(self, images: torch.Tensor):
        found = [self.detections(image) for image in images]
        return self.select([f[0] for f in found], [f[1] for f in found])

    def select(self, boxes: list[torch.Tensor], scores: list[torch.Tensor]):
        """Keep at most ``max_boxes`` boxes with score >= threshold per image, padded to J."""
        j = self.max_boxes
        out_b = torch.zeros(len(boxes), j, 4)
        out_s = torch.zeros(len(boxes), j)
        for i, (b, s) in enumerate(zip(boxes, scores)):
            keep = torch.nonzero(s >= self.score_threshold).flatten()
            keep = keep[torch.argsort(s[keep], descending=True)][:j]
            out_b[i, : len(keep)] = b[keep]
            out_s[i, : len(keep)] = s[keep]
        return out_b, out_s


def detector_class(name: str) -> type[Detector]:
    """The detector class ``name`` names in :data:`fbnet.models.registry.DETECTORS`."""
    return resolve(DETECTORS, name, "detector")


def build_detector(cfg: DetectorConfig, num_classes: int, image_size: int) -> Detector | None:
    """The detector named by ``cfg`` (``None`` for ``name: none``), weights from ``cfg.weights``."""
    if cfg.name == "none":
        return None
    return detector_class(cfg.name).from_config(cfg, num_classes, image_size)


def finetune(detector: Detector, images: np.ndarray, boxes: list[list[list[float]]], cfg: DetectorConfig,
             seed: int = 0) -> list[dict]:
    """Train ``detector`` on canvases ``images (N, 3, S, S)`` and per-image ``[x1, y1, x2, y2, cls]``
    (:meth:`Detector.finetune`). Returns per-epoch losses."""
    return detector.finetune(images, boxes, cfg, seed)


@torch.no_grad()
def detect(detector: Detector | None, images: torch.Tensor, batch_size: int = 16):
    """Boxes and scores for ``(N, 3, S, S)`` canvases; no detector means no boxes."""
    n = images.shape[0]
    if detector is None:
        return torch.zeros(n, 0, 4), torch.zeros(n, 0)
    detector.eval()
    outs = [detector(images[i: i + batch_size]) for i in range(0, n, batch_size)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
