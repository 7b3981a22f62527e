"""Block features: a frozen torchvision CNN turns every window box into one vector.

The paper encodes each block with AlexNet's fc7 (4096-d). Two modes share one module:

* ``crop`` (the paper's): each block is cropped from the canvas and resized to ``crop_size``
  (bilinear RoIAlign on the image, so it runs in an exported graph), then the whole CNN runs
  on every crop.
* ``roi``: the CNN trunk runs once per image and each block is pooled from its feature map with
  RoIAlign, then the head runs per block. One pass per image instead of one per block.

Inputs are canvases in [0, 1]; ImageNet mean/std normalisation happens here.

Fine-tuning the top (``backbone.trainable_blocks: k``, ``roi`` mode): the trunk is split into a
frozen ``lower`` part and its last ``k`` modules (MobileNetV2: ``k = 2`` is the last inverted
residual block, 160 -> 320 channels, and the 1x1 convolution to 1280, both on the 7 x 7 map of a
224 px canvas; 14 x 14 with ``backbone.output_stride: 16``, which runs the last stride-2 stage at
stride 1 with dilated convolutions). Training caches :meth:`BlockEncoder.lower` once per image
(:mod:`fbnet.activations`) and runs :meth:`BlockEncoder.pool_blocks` (the top, then RoIAlign) in
every step, so the same module, with its fine-tuned top, is what the exported image encoder runs.
Batch-norm statistics stay frozen (the module is always in eval mode); only weights are trained.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import roi_align

from ..config import BackboneConfig
from ..errors import FbnetError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from .registry import BACKBONES


class WeightsError(FbnetError, ValueError):
    """Backbone or detector weights cannot be loaded; the message names the file."""


def load_torch_file(path: str | Path, what: str = "weights file"):
    """What ``torch.load`` reads from ``path`` (tensors and plain containers only), or one
    :class:`WeightsError` naming the file: ``what`` not found, or not a readable torch file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable torch file ({str(exc).splitlines()[0][:200]})") from None


def load_state_dict_file(path: str | Path) -> dict:
    sd = load_torch_file(path)
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
        self.out_dim = BACKBONES[cfg.name]
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
            if cfg.output_stride == 16:
                _dilate_last_stride(self.trunk)
                self.stride = 16
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: dropout and batch-norm stay in eval mode
        return super().train(False)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if self.cfg.mode == "crop":
            n, k = boxes.shape[:2]
            size = self.cfg.crop_size
            crops = roi_align(images, _rois(boxes), output_size=(size, size), spatial_scale=1.0,
                              sampling_ratio=2, aligned=True)
            return self.crop_head(self.trunk((crops - self.mean) / self.std)).reshape(n, k, -1)
        return self.pool_blocks(self.lower(images), boxes)

    @property
    def split_at(self) -> int:
        """Index of the first trunk module that is fine-tuned (``len(trunk)`` when none is)."""
        return len(self.trunk) - self.cfg.trainable_blocks

    def lower(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen part of the trunk on canvases ``(N, 3, S, S)``: what training caches."""
        return self.trunk[: self.split_at]((images - self.mean) / self.std)

    def top(self) -> nn.Module:
        """The trunk's fine-tuned modules (empty when ``trainable_blocks`` is 0)."""
        return self.trunk[self.split_at:]

    def pool_blocks(self, lower: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Block features ``(N, K, C)`` from the lower trunk's activations ``(N, C', h, w)`` and
        boxes ``(N, K, 4)`` on the canvas: the top of the trunk, RoIAlign, the per-block head.

        RoIAlign runs as a matrix product: it is linear in the feature map, so each block's bins
        are fixed weightings of the map's cells (:func:`roi_align_weights`), applied in one batched
        product. A mean head averages the bins' weights first, so a block costs one row of ``h*w``
        weights. The same values as torchvision's ``roi_align`` (tested); in training it replaces
        torchvision's CPU backward (a loop over boxes and channels: 1.6 s of a 64-image step on 2
        cores), and in the exported graph ONNX Runtime's RoiAlign (5.7 of the image encoder's 21 ms
        for 140 blocks of a 1280 x 7 x 7 map). The top runs in float32 (bfloat16 convolutions are
        slower on CPUs without native bfloat16 units)."""
        with torch.autocast(lower.device.type, enabled=False):
            fmap = self.top()(lower.float())
            n, c, h, w = fmap.shape
            k = boxes.shape[1]
            with torch.no_grad():
                weights = roi_align_weights(boxes.float(), h, w, 1.0 / self.stride, self.pool)
            flat = fmap.reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
            if isinstance(self.head, _MeanPool):  # the head averages the bins: average the weights
                return torch.bmm(weights.mean(dim=2), flat)
            pooled = torch.bmm(weights.reshape(n, -1, h * w), flat)  # (N, K * pool**2, C)
            pooled = pooled.reshape(n * k, self.pool, self.pool, c).permute(0, 3, 1, 2)
            return self.head(pooled).reshape(n, k, -1)

    def lower_state(self) -> dict:
        """The frozen part's weights (what a cache of :meth:`lower` depends on)."""
        return self.trunk[: self.split_at].state_dict()


def roi_align_weights(boxes: torch.Tensor, h: int, w: int, scale: float, pool: int,
                      sampling_ratio: int = 2) -> torch.Tensor:
    """RoIAlign's weights: ``(N, K, pool**2, h*w)``, bin ``(py, px)`` of box ``k`` as a weighting of
    the ``h x w`` map's cells, so ``weights @ map`` is ``roi_align(map, boxes, pool, scale,
    sampling_ratio, aligned=True)`` (Mask R-CNN's RoIAlign as torchvision computes it).

    A bin averages ``sampling_ratio**2`` bilinear samples on a regular grid, and bilinear
    interpolation is separable: a sample at ``(y, x)`` weights cell ``(i, j)`` by
    ``max(0, 1 - |i - y|) * max(0, 1 - |j - x|)``, with torchvision's edge rules (a coordinate is
    clamped into ``[0, size - 1]``; a sample more than one cell outside the map counts as zero).
    So a bin's weights are the outer product of one row of ``h`` and one row of ``w`` weights.
    Elementwise operations and one product: what an exported graph and TensorRT's parser take."""
    grid = pool * sampling_ratio
    # sample s of a box's side lies at start + (s + 0.5) * length / grid (aligned: start shifted by
    # half a cell); bin p averages samples p * ratio .. (p + 1) * ratio - 1
    steps = (torch.arange(grid, dtype=boxes.dtype, device=boxes.device) + 0.5) / grid

    def side(lo: torch.Tensor, hi: torch.Tensor, size: int) -> torch.Tensor:  # (N, K, pool, size)
        at = (lo * scale - 0.5).unsqueeze(-1) + ((hi - lo) * scale).unsqueeze(-1) * steps
        inside = ((at >= -1.0) & (at <= size)).to(boxes.dtype)
        cells = torch.arange(size, dtype=boxes.dtype, device=boxes.device)
        tent = (1.0 - (cells - at.clamp(0.0, size - 1.0).unsqueeze(-1)).abs()).clamp(min=0.0)
        per_sample = tent * inside.unsqueeze(-1)  # (N, K, grid, size)
        return per_sample.reshape(*at.shape[:2], pool, sampling_ratio, size).mean(dim=3)

    n, k = boxes.shape[:2]
    rows = side(boxes[..., 1], boxes[..., 3], h)  # (N, K, pool, h)
    cols = side(boxes[..., 0], boxes[..., 2], w)  # (N, K, pool, w)
    weights = rows[:, :, :, None, :, None] * cols[:, :, None, :, None, :]  # (N, K, py, px, h, w)
    return weights.reshape(n, k, pool * pool, h * w)


def _split(name: str, net: nn.Module):
    """(trunk, stride, RoIAlign size, per-block head, per-crop head) of a torchvision classifier."""
    if name == "alexnet":
        # conv5 before the last max-pool (stride 16), pooled to 6x6, then fc6 -> fc7 (4096).
        head = nn.Sequential(nn.Flatten(), *list(net.classifier.children())[:6])
        return net.features[:-1], 16, 6, head, nn.Sequential(net.features[-1], net.avgpool, head)
    trunk = net.features if name == "mobilenet_v2" else nn.Sequential(*list(net.children())[:-2])
    return trunk, 32, 2, _MeanPool(), _MeanPool()


def _dilate_last_stride(trunk: nn.Module) -> None:
    """Output stride 16 (DeepLab v3's atrous MobileNetV2): the trunk's last stride-2 3x3
    convolution runs at stride 1, and every 3x3 convolution after it is dilated by 2 (padding 2),
    so their receptive fields over the input stay what the pretrained weights were trained with."""
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    last = max(i for i, m in enumerate(convs) if m.stride == (2, 2))
    convs[last].stride = (1, 1)
    for m in convs[last + 1:]:
        m.dilation, m.padding = (2, 2), (2, 2)


def _rois(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, K, 4)`` boxes -> RoIAlign's ``(N*K, 5)`` rows of (batch index, x1, y1, x2, y2)."""
    n, k = boxes.shape[:2]
    idx = torch.arange(n, dtype=boxes.dtype, device=boxes.device).repeat_interleave(k).unsqueeze(1)
    return torch.cat([idx, boxes.reshape(n * k, 4)], dim=1)


class _MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
