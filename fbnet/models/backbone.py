"""Block features: a frozen torchvision CNN turns every window box into one vector.

The paper encodes each block with AlexNet's fc7 (4096-d). Two modes share one module:

* ``crop`` (the paper's): each block is cropped from the canvas and resized to ``crop_size``
  (bilinear RoIAlign on the image, so it runs in an exported graph), then the whole CNN runs
  on every crop.
* ``roi``: the CNN trunk runs once per image and each block is pooled from its feature map with
  RoIAlign, then the head runs per block. One pass per image instead of one per block.

Inputs are canvases in [0, 1]; ImageNet mean/std normalisation happens here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import roi_align

from ..config import BackboneConfig
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD

FEATURE_DIMS = {"alexnet": 4096, "mobilenet_v2": 1280, "resnet18": 512, "detector": 512}


class WeightsError(ValueError):
    """Backbone or detector weights cannot be loaded; the message names the file."""


def load_state_dict_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable torch state_dict ({exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state_dict (a mapping of tensors)")
    return sd


def build_torchvision(name: str, weights: str) -> nn.Module:
    """A torchvision classifier with ``weights``: '' (random), 'imagenet' (weights API) or a path."""
    import torchvision

    ctor = getattr(torchvision.models, name)
    if weights == "imagenet":
        return ctor(weights="DEFAULT")
    model = ctor(weights=None)
    if weights:
        sd = load_state_dict_file(weights)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        trunk_missing = [k for k in missing if not k.startswith(("classifier", "fc."))]
        if trunk_missing or unexpected:
            raise WeightsError(
                f"{weights}: does not fit torchvision's {name}: missing {trunk_missing[:3]}..., "
                f"unexpected {list(unexpected)[:3]}..."
            )
    return model


class BlockEncoder(nn.Module):
    """Frozen CNN that maps ``(N, 3, S, S)`` canvases and ``(N, K, 4)`` boxes to ``(N, K, C)``.

    ``name: detector`` reuses the trunk of the light detector fine-tuned on the dataset's boxes
    (pass it as ``trunk``): the offline default, where no ImageNet weights can be had. Its 2x2
    RoIAlign cells are concatenated (4 x 128 = 512-d) to keep the block's layout.
    """

    def __init__(self, cfg: BackboneConfig, seed: int = 0, trunk: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.out_dim = FEATURE_DIMS[cfg.name]
        if cfg.name == "detector":
            if trunk is None:
                raise ValueError("backbone 'detector' needs the detector's trunk")
            self.trunk = copy.deepcopy(trunk)
            self.stride, self.pool = trunk.stride, 2
            self.head = nn.Flatten()
            self.crop_head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
        else:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                net = build_torchvision(cfg.name, cfg.weights)
            self.trunk, self.stride, self.pool, self.head, self.crop_head = _split(cfg.name, net)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: dropout and batch-norm stay in eval mode
        return super().train(False)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        n, k = boxes.shape[:2]
        rois = _rois(boxes)
        if self.cfg.mode == "crop":
            size = self.cfg.crop_size
            crops = roi_align(images, rois, output_size=(size, size), spatial_scale=1.0,
                              sampling_ratio=2, aligned=True)
            feats = self.crop_head(self.trunk((crops - self.mean) / self.std))
        else:
            fmap = self.trunk((images - self.mean) / self.std)
            pooled = roi_align(fmap, rois, output_size=(self.pool, self.pool),
                               spatial_scale=1.0 / self.stride, sampling_ratio=2, aligned=True)
            feats = self.head(pooled)
        return feats.reshape(n, k, -1)


def _split(name: str, net: nn.Module):
    """(trunk, stride, RoIAlign size, per-block head, per-crop head) of a torchvision classifier."""
    if name == "alexnet":
        # conv5 before the last max-pool (stride 16), pooled to 6x6, then fc6 -> fc7 (4096).
        head = nn.Sequential(nn.Flatten(), *list(net.classifier.children())[:6])
        return net.features[:-1], 16, 6, head, nn.Sequential(net.features[-1], net.avgpool, head)
    trunk = net.features if name == "mobilenet_v2" else nn.Sequential(*list(net.children())[:-2])
    return trunk, 32, 2, _MeanPool(), _MeanPool()


def _rois(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, K, 4)`` boxes -> RoIAlign's ``(N*K, 5)`` rows of (batch index, x1, y1, x2, y2)."""
    n, k = boxes.shape[:2]
    idx = torch.arange(n, dtype=boxes.dtype, device=boxes.device).repeat_interleave(k).unsqueeze(1)
    return torch.cat([idx, boxes.reshape(n * k, 4)], dim=1)


class _MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
