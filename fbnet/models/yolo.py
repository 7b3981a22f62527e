"""YOLOv3-tiny built in PyTorch from a Darknet ``.cfg`` and ``.weights`` pair (COCO, offline).

The network is read layer by layer from the cfg (``convolutional``, ``maxpool``, ``route``,
``upsample``, ``yolo``) and the weights file is read in cfg order: a header (major, minor,
revision as int32, then ``seen`` as int64 from version 0.2 on), then per convolution either
batch-norm (beta, gamma, running mean, running variance) or a bias, then the kernel.

:class:`YoloDetector` implements the :class:`~fbnet.models.detector.Detector` interface: the
``S x S`` canvas is resized to the network's input (416, or ``model.detector.input_size``), YOLO
heads are decoded (``x = (sigmoid(tx) + cx) / W``, ``w = exp(tw) anchor_w / input``; score =
objectness x class probability), class-aware NMS keeps the best boxes, and the top J with score >=
threshold are returned in canvas pixels, zero-padded, like every other detector here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from ..config import DetectorConfig
from .backbone import WeightsError
from .detector import Detector


def parse_cfg(path: str | Path) -> list[dict]:
    """Darknet cfg sections as dicts (``type`` plus the section's keys), in file order."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: Darknet cfg not found")
    sections: list[dict] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append({"type": line.strip("[]").strip(), "_line": lineno})
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
        else:
            raise WeightsError(f"{path} line {lineno}: cannot parse {raw!r}")
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise WeightsError(f"{path}: a Darknet cfg starts with a [net] section")
    return sections


class YoloV3Tiny(nn.Module):
    """The Darknet network; ``forward`` returns the raw outputs of every yolo layer."""

    def __init__(self, cfg_path: str | Path):
        super().__init__()
        sections = parse_cfg(cfg_path)
        net = sections[0]
        self.size = int(net.get("width", 416))
        self.layers = nn.ModuleList()
        self.kinds: list[tuple] = []
        self.heads: list[dict] = []
        channels, out_channels = int(net.get("channels", 3)), []
        for s in sections[1:]:
            kind = s["type"]
            if kind == "convolutional":
                filters, k = int(s["filters"]), int(s["size"])
                bn = int(s.get("batch_normalize", 0))
                pad = k // 2 if int(s.get("pad", 0)) else 0
                block = nn.Sequential()
                block.add_module("conv", nn.Conv2d(channels, filters, k, int(s.get("stride", 1)), pad, bias=not bn))
                if bn:
                    block.add_module("bn", nn.BatchNorm2d(filters, eps=1e-5))
                if s.get("activation", "linear") == "leaky":
                    block.add_module("act", nn.LeakyReLU(0.1))
                self.layers.append(block)
                self.kinds.append(("conv",))
                channels = filters
            elif kind == "maxpool":
                size, stride = int(s["size"]), int(s["stride"])
                pool = nn.MaxPool2d(size, stride)
                # Darknet pads (size - 1) on the right/bottom when stride is 1 (keeps the size)
                self.layers.append(nn.Sequential(nn.ReplicationPad2d((0, size - 1, 0, size - 1)), pool)
                                   if stride == 1 else pool)
                self.kinds.append(("pool",))
            elif kind == "upsample":
                self.layers.append(nn.Upsample(scale_factor=int(s["stride"]), mode="nearest"))
                self.kinds.append(("up",))
            elif kind == "route":
                here = len(self.layers)
                refs = [int(v) for v in s["layers"].split(",")]
                refs = [r if r >= 0 else here + r for r in refs]
                self.layers.append(nn.Identity())
                self.kinds.append(("route", refs))
                channels = sum(out_channels[r] for r in refs)
            elif kind == "yolo":
                anchors = [float(v) for v in s["anchors"].split(",")]
                anchors = [(anchors[2 * i], anchors[2 * i + 1]) for i in range(len(anchors) // 2)]
                mask = [int(v) for v in s["mask"].split(",")]
                self.heads.append({"anchors": [anchors[m] for m in mask], "classes": int(s["classes"])})
                self.layers.append(nn.Identity())
                self.kinds.append(("yolo", len(self.heads) - 1))
            else:
                raise WeightsError(f"{cfg_path} line {s['_line']}: unsupported layer [{kind}]")
            out_channels.append(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, heads = [], []
        for layer, kind in zip(self.layers, self.kinds):
            if kind[0] == "route":
                x = torch.cat([outputs[r] for r in kind[1]], dim=1)
            elif kind[0] == "yolo":
                heads.append(x)
            else:
                x = layer(x)
            outputs.append(x)
        return heads

    def load_darknet_weights(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: Darknet weights not found")
        data = path.read_bytes()
        major, minor, _ = np.frombuffer(data[:12], dtype="<i4")
        offset = 12 + (8 if major * 10 + minor >= 2 else 4)
        values = np.frombuffer(data[offset:], dtype="<f4")
        pos = 0

        def take(t: torch.Tensor):
            nonlocal pos
            n = t.numel()
            if pos + n > len(values):
                raise WeightsError(f"{path}: truncated: the cfg needs more parameters than the file holds")
            t.data.copy_(torch.from_numpy(values[pos: pos + n].copy()).view_as(t))
            pos += n

        for layer, kind in zip(self.layers, self.kinds):
            if kind[0] != "conv":
                continue
            conv = layer.conv
            if hasattr(layer, "bn"):
                bn = layer.bn
                for t in (bn.bias, bn.weight, bn.running_mean, bn.running_var):
                    take(t)
            else:
                take(conv.bias)
            take(conv.weight)
        if pos != len(values):
            raise WeightsError(f"{path}: {len(values) - pos} parameters left over; weights do not match the cfg")

    def decode(self, heads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes ``(N, P, 4)`` (x1, y1, x2, y2 in network pixels), objectness ``(N, P)`` and class
        probabilities ``(N, P, classes)`` of every prediction of every yolo layer."""
        parts = [self.decode_head(out, head) for out, head in zip(heads, self.heads)]
        return tuple(torch.cat([p[i].flatten(1, 3) for p in parts], dim=1) for i in range(3))

    def decode_head(self, out: torch.Tensor, head: dict):
        """One yolo layer: boxes ``(N, A, H, W, 4)``, objectness ``(N, A, H, W)``, classes ``(..., C)``."""
        n, _, h, w = out.shape
        a = len(head["anchors"])
        p = out.view(n, a, 5 + head["classes"], h, w).permute(0, 1, 3, 4, 2)  # (N, A, H, W, 5+C)
        gy, gx = torch.meshgrid(torch.arange(h, dtype=out.dtype), torch.arange(w, dtype=out.dtype), indexing="ij")
        anchors = torch.tensor(head["anchors"], dtype=out.dtype).view(1, a, 1, 1, 2)
        cx = (torch.sigmoid(p[..., 0]) + gx) * (self.size / w)
        cy = (torch.sigmoid(p[..., 1]) + gy) * (self.size / h)
        bw = torch.exp(p[..., 2]) * anchors[..., 0]
        bh = torch.exp(p[..., 3]) * anchors[..., 1]
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
        return boxes, torch.sigmoid(p[..., 4]), torch.sigmoid(p[..., 5:])


class YoloDetector(Detector):
    """YOLOv3-tiny behind the detector interface (canvas in, J scored boxes out)."""

    def __init__(self, net: YoloV3Tiny, max_boxes: int = 9, score_threshold: float = 0.1,
                 nms_iou: float = 0.45):
        super().__init__()
        self.net, self.max_boxes, self.score_threshold, self.nms_iou = net, max_boxes, score_threshold, nms_iou

    @classmethod
    def from_config(cls, cfg: DetectorConfig, num_classes: int, image_size: int) -> YoloDetector:
        """COCO's 80 classes whatever the dataset's (``num_classes`` is unused): see :func:`build_yolov3_tiny`."""
        return build_yolov3_tiny(cfg, image_size)

    def detections(self, image: torch.Tensor):
        canvas = image.shape[-1]
        x = F.interpolate(image[None], size=(self.net.size, self.net.size), mode="bilinear", align_corners=False)
        boxes, obj, cls = self.net.decode(self.net(x))
        scores, labels = (obj[0].unsqueeze(-1) * cls[0]).max(dim=-1)
        boxes = (boxes[0] * (canvas / self.net.size)).clamp(0, canvas)
        keep = torch.nonzero(scores >= self.score_threshold).flatten()
        keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], self.nms_iou)]  # sorted by score
        return boxes[keep], scores[keep]


def build_yolov3_tiny(cfg: DetectorConfig, image_size: int) -> YoloDetector:
    """``cfg.weights`` names the directory holding ``yolov3-tiny.cfg`` and ``yolov3-tiny.weights``;
    ``cfg.input_size``, when set, replaces the cfg's input width (the network is fully convolutional
    and its anchors are in input pixels, as Darknet runs it at other sizes)."""
    if not cfg.weights:
        raise WeightsError("detector yolov3_tiny: set model.detector.weights to the directory holding "
                           "yolov3-tiny.cfg and yolov3-tiny.weights")
    root = Path(cfg.weights)
    net = YoloV3Tiny(root / "yolov3-tiny.cfg")
    net.load_darknet_weights(root / "yolov3-tiny.weights")
    net.size = cfg.input_size or net.size
    net.eval()
    return YoloDetector(net, cfg.max_boxes, cfg.score_threshold)
