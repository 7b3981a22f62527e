"""A light detection head on MobileNetV2's own feature maps (``model.detector.name:
mobilenet_v2_head``), trained by distilling a teacher detector's boxes (:mod:`fbnet.distill`).

Issue 20: at a 160 px input, YOLOv3-tiny still took 7.5-9 ms of a 28 ms image query (BENCHMARKS
"Image query: detector input size"), on top of the MobileNetV2 pass the image encoder makes. This
detector runs MobileNetV2's frozen ImageNet layers up to the 160-channel stage (``features[:17]``,
what :meth:`~fbnet.models.backbone.BlockEncoder.lower` computes with ``trainable_blocks: 2``) and
reads two of its maps, as YOLOv3-tiny reads two of its own:

* after ``features[13]``: 96 channels, stride 16 (14 x 14 on a 224 px canvas);
* after ``features[16]``: 160 channels, stride 32 (7 x 7).

On each, one small head (3 x 3 convolution to ``hidden`` channels, ReLU, 1 x 1 convolution to
``A x 5``) predicts, per cell and anchor, ``tx, ty, tw, th`` and an objectness logit, decoded as
YOLOv3 decodes (``x = (sigmoid(tx) + cx) stride``, ``w = exp(tw) anchor_w``). The head is
class-agnostic: F-Net needs boxes, not labels. Scores are ``sigmoid(objectness)``; boxes with
score >= ``score_threshold`` go through NMS (IoU 0.45, YOLOv3's) and the top J are kept, like every
:class:`~fbnet.models.detector.Detector`. Distillation teaches the objectness the teacher's own
score, so the threshold means what it meant for the teacher.

Reconstruction: the paper detects with Faster R-CNN; this head (two maps, three anchors each,
YOLOv3's decoding and assignment, anchors by k-means of the teacher's boxes) is ours.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.ops import nms

from ..config import DetectorConfig
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from .backbone import WeightsError, build_torchvision, load_torch_file
from .detector import Detector

#: MobileNetV2 ``features`` index ranges whose outputs the heads read: ``[0, 14)`` ends at the
#: 96-channel stage (stride 16), ``[14, 17)`` at the 160-channel stage (stride 32)
STAGES = ((0, 14), (14, 17))
CHANNELS = (96, 160)
STRIDES = (16, 32)
ANCHORS_PER_MAP = 3
#: anchors (w, h) in canvas pixels before distillation sets them by k-means (a 224 px canvas)
DEFAULT_ANCHORS = ((24, 32), (48, 64), (80, 112), (112, 96), (160, 176), (216, 216))
#: ``tw``, ``th`` are clamped here before ``exp`` (a box at most e^4 = 55x its anchor)
MAX_LOG_SCALE = 4.0
NMS_IOU = 0.45
#: what marks a file :mod:`fbnet.distill` wrote
KIND = "fbnet-distilled-detector"


class MobileNetHeadDetector(Detector):
    """MobileNetV2's frozen layers plus two distilled YOLO-style heads (see the module doc)."""

    def __init__(self, max_boxes: int = 9, score_threshold: float = 0.1, hidden: int = 128,
                 trunk_weights: str = ""):
        """``trunk_weights``: MobileNetV2 weights for the frozen layers ('' random, a state_dict
        path); a distilled state (:meth:`from_config`) replaces them with its own copy."""
        super().__init__()
        self.max_boxes, self.score_threshold = max_boxes, score_threshold
        features = build_torchvision("mobilenet_v2", trunk_weights).features
        self.stages = nn.ModuleList(features[a:b] for a, b in STAGES)
        self.stages.requires_grad_(False)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(hidden, ANCHORS_PER_MAP * 5, 1)) for c in CHANNELS)
        self.register_buffer("anchors", torch.tensor(DEFAULT_ANCHORS, dtype=torch.float32).view(len(STAGES), -1, 2))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: DetectorConfig, num_classes: int, image_size: int) -> MobileNetHeadDetector:
        """``cfg.weights``: the state :mod:`fbnet.distill` wrote (``fbnet distill-detector``); empty
        gives random weights (tests). ``num_classes`` is unused: the head is class-agnostic."""
        det = cls(cfg.max_boxes, cfg.score_threshold)
        if cfg.weights:
            det.load_state_dict(read_distilled(cfg.weights)["state_dict"])
        return det.eval()

    def train(self, mode: bool = True):
        """Only the heads ever train: MobileNetV2's batch-norm statistics stay frozen."""
        super().train(mode)
        self.stages.eval()
        return self

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen maps the heads read, for canvases ``(N, 3, S, S)`` in [0, 1]."""
        x, out = (images - self.mean) / self.std, []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def predict(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw predictions per map, ``(N, A, H, W, 5)``: tx, ty, tw, th, objectness logit."""
        out = []
        for head, m in zip(self.heads, maps):
            p = head(m)
            n, _, h, w = p.shape
            out.append(p.view(n, ANCHORS_PER_MAP, 5, h, w).permute(0, 1, 3, 4, 2))
        return out

    def decode(self, preds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes ``(N, P, 4)`` in canvas pixels (x1, y1, x2, y2) and objectness logits ``(N, P)`` of
        every prediction of both maps."""
        boxes, logits = [], []
        for p, anchors, stride in zip(preds, self.anchors, STRIDES):
            n, a, h, w, _ = p.shape
            gy, gx = torch.meshgrid(torch.arange(h, dtype=p.dtype), torch.arange(w, dtype=p.dtype), indexing="ij")
            cx = (torch.sigmoid(p[..., 0]) + gx) * stride
            cy = (torch.sigmoid(p[..., 1]) + gy) * stride
            bw = torch.exp(p[..., 2].clamp(max=MAX_LOG_SCALE)) * anchors[:, 0].view(1, a, 1, 1)
            bh = torch.exp(p[..., 3].clamp(max=MAX_LOG_SCALE)) * anchors[:, 1].view(1, a, 1, 1)
            boxes.append(torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).flatten(1, 3))
            logits.append(p[..., 4].flatten(1))
        return torch.cat(boxes, dim=1), torch.cat(logits, dim=1)

    def detections(self, image: torch.Tensor):
        return self.kept(self.maps(image[None]), image.shape[-1])[0]

    def kept(self, maps: list[torch.Tensor], canvas: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image of ``maps``: the boxes (clamped to the ``canvas``) and scores with score >=
        ``score_threshold`` that survive NMS, best first."""
        boxes, logits = self.decode(self.predict(maps))
        out = []
        for b, logit in zip(boxes.clamp(0, canvas), logits):
            s = torch.sigmoid(logit)
            keep = torch.nonzero(s >= self.score_threshold).flatten()
            keep = keep[nms(b[keep], s[keep], NMS_IOU)]  # sorted by score
            out.append((b[keep], s[keep]))
        return out


def read_distilled(path: str | Path) -> dict:
    """A file :mod:`fbnet.distill` wrote: ``state_dict``, ``detector`` (the ``model.detector`` keys
    it serves: name, max_boxes, score_threshold), ``canvas`` and ``distillation`` (its teacher and
    dev agreement). Anything else is refused with one line naming the file."""
    data = load_torch_file(path, "distilled detector")
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise WeightsError(f"{path}: not a distilled detector (fbnet distill-detector writes one)")
    return data
