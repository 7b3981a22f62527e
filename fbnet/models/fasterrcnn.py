"""torchvision's Faster R-CNN behind the :class:`~fbnet.models.detector.Detector` interface.

``fasterrcnn`` is torchvision's ResNet-50 FPN model (COCO weights through the weights API or a
local state_dict); ``fasterrcnn_light`` is the same architecture on a small trunk
(:func:`light_trunk`) that :meth:`TorchvisionDetector.finetune` trains on a dataset's boxes in
minutes on a CPU, and whose trunk ``backbone: detector`` reuses as its block encoder.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DetectorConfig
from .backbone import load_state_dict_file
from .detector import Detector


class TorchvisionDetector(Detector):
    """Wraps a torchvision ``GeneralizedRCNN`` (Faster R-CNN)."""

    def __init__(self, model: nn.Module, max_boxes: int = 9, score_threshold: float = 0.1):
        super().__init__()
        self.model = model
        self.max_boxes, self.score_threshold = max_boxes, score_threshold

    def detections(self, image: torch.Tensor):
        out = self.model([image])[0]
        return out["boxes"], out["scores"]

    def forward(self, images: torch.Tensor):  # one batched call through the R-CNN
        out = self.model(list(images))
        return self.select([o["boxes"] for o in out], [o["scores"] for o in out])

    @property
    def trunk(self) -> nn.Module:
        """The convolutional body of the detector's backbone (used as a block encoder)."""
        return self.model.backbone.body

    @classmethod
    def from_config(cls, cfg: DetectorConfig, num_classes: int, image_size: int) -> TorchvisionDetector:
        """``fasterrcnn`` (ResNet-50 FPN; ``weights: coco`` through torchvision's weights API) or
        ``fasterrcnn_light`` (:func:`light_trunk`); ``cfg.weights`` a local state_dict otherwise."""
        from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.ops import MultiScaleRoIAlign

        size = dict(min_size=image_size, max_size=image_size, box_score_thresh=0.0,
                    box_detections_per_img=max(100, cfg.max_boxes))
        if cfg.name == "fasterrcnn":
            coco = cfg.weights == "coco"
            model = fasterrcnn_resnet50_fpn(weights="DEFAULT" if coco else None, weights_backbone=None,
                                            num_classes=91 if coco or not num_classes else num_classes + 1,
                                            **size)
        else:
            anchors = AnchorGenerator(sizes=((12, 24, 48, 96),), aspect_ratios=((0.5, 1.0, 2.0),))
            model = FasterRCNN(
                _Body(light_trunk()), num_classes=max(num_classes, 1) + 1, rpn_anchor_generator=anchors,
                box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), representation_size=256,
                rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
                box_batch_size_per_image=64, **size,
            )
        if cfg.weights and cfg.weights != "coco":
            model.load_state_dict(load_state_dict_file(cfg.weights))
        return cls(model, cfg.max_boxes, cfg.score_threshold)

    def finetune(self, images: np.ndarray, boxes: list[list[list[float]]], cfg: DetectorConfig,
                 seed: int = 0) -> list[dict]:
        """Train the R-CNN on canvases ``images (N, 3, S, S)`` and per-image ``[x1, y1, x2, y2, cls]``.

        SGD with momentum, cosine learning-rate decay, horizontal flips. Returns per-epoch losses.
        """
        gen = torch.Generator().manual_seed(seed)
        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
        steps = cfg.epochs * math.ceil(len(images) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
        history = []
        bar = tqdm(total=steps, desc="detector", unit="batch")
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(images), generator=gen).tolist()
            total, t0 = 0.0, time.time()
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start: start + cfg.batch_size]
                batch, targets = [], []
                for i in idx:
                    img = torch.from_numpy(images[i])
                    b = torch.tensor([bb[:4] for bb in boxes[i]], dtype=torch.float32).reshape(-1, 4)
                    lab = torch.tensor([int(bb[4]) + 1 for bb in boxes[i]], dtype=torch.int64)
                    if torch.rand((), generator=gen) < 0.5:
                        img = img.flip(-1)
                        w = img.shape[-1]
                        b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
                    batch.append(img)
                    targets.append({"boxes": b, "labels": lab})
                losses = model(batch, targets)
                loss = sum(losses.values())
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            history.append({"epoch": epoch + 1, "loss": total / len(images), "seconds": time.time() - t0})
        bar.close()
        model.eval()
        return history


def light_trunk() -> nn.Sequential:
    """Five conv-BN-ReLU stages to stride 8 with 128 channels: fast enough to train on a CPU."""
    chans = [(3, 32, 2), (32, 64, 2), (64, 96, 2), (96, 128, 1), (128, 128, 1)]
    body = nn.Sequential(*[
        nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        for i, o, s in chans
    ])
    body.out_channels, body.stride = 128, 8
    return body


class _Body(nn.Module):
    """Adapts a single-map trunk to the backbone interface torchvision's detectors expect."""

    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body
        self.out_channels = body.out_channels

    def forward(self, x):
        return {"0": self.body(x)}
