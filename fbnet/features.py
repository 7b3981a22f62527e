"""Block features, extracted once per split with the frozen encoder and cached on disk.

For every image: detect boxes (F-Net), cut the window boxes of both branches
(:func:`fbnet.windows.branch_blocks`), and encode every block. A split's cache is a directory of
``.npy`` arrays (float16 features) written atomically, with a ``key`` file that records what made
it; a cache whose key differs is rebuilt, so a changed backbone or detector is never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_dir
from .data.manifest import Item
from .models.backbone import BlockEncoder
from .models.detector import Detector, detect
from .preprocess import load_image
from .windows import blocks_upto, branch_blocks, image_block_boxes

FILES = ("bg", "fg", "mask", "boxes")  # a split cache's arrays, as ``<name>.npy``


@dataclass
class SplitFeatures:
    background: np.ndarray  # (N, B, C) float16
    foreground: np.ndarray  # (N, J, B, C) float16
    fg_mask: np.ndarray  # (N, J) bool
    boxes: np.ndarray  # (N, J, 4) detector boxes on the canvas (0 where none)
    canvas: int = 0  # side of the canvas the boxes are on

    def __len__(self) -> int:
        return len(self.fg_mask)

    def tensors(self, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float tensors of the images at ``index``: B-Net blocks, F-Net blocks, the box mask and
        the F-Net regions' boxes (see :meth:`region_boxes`). Real boxes come first in ``fg_mask``,
        so box slots past the largest box count among these images are padding in every one of
        them; they are dropped (exact: masked blocks never enter eqs. 13-15) to spare F-Net's work."""
        mask = np.array(self.fg_mask[index])
        j = max(1, int(mask.sum(axis=1).max())) if len(mask) else mask.shape[1]
        take = lambda a: torch.from_numpy(np.array(a[index, :j]))  # noqa: E731  (copies out of the memmap)
        return (torch.from_numpy(np.array(self.background[index])).float(), take(self.foreground).float(),
                torch.from_numpy(mask[:, :j]), take(self.region_boxes()))

    def region_boxes(self) -> np.ndarray:
        """The box each F-Net region covers, ``(N, J, 4)`` as fractions of the canvas: the detector's
        boxes laid out as :func:`~fbnet.windows.branch_blocks` lays them for the image encoder (the
        whole image where none was found; padded slots repeat it), so training reads the geometry
        the exported image encoder reads. Computed once."""
        if getattr(self, "_regions", None) is None:
            size, j = float(self.canvas), self.fg_mask.shape[1]
            out = np.empty((len(self.fg_mask), j, 4), np.float32)
            for i, b in enumerate(np.asarray(self.boxes, dtype=np.float32)):
                out[i] = branch_blocks(size, b[np.any(b != 0, axis=1)], 1, j)[1][:, 0]
            self._regions = out / size
        return self._regions


@torch.no_grad()
def detect_blocks(canvases: torch.Tensor, detector: Detector | None, levels: int, max_boxes: int):
    """Window boxes of both branches for canvases ``(N, 3, S, S)``: ``block_boxes (N, (1+J)*B, 4)``
    (B-Net's blocks, then each box's), the box mask ``(N, J)`` and the detector's boxes ``(N, J, 4)``
    (zero where none)."""
    size = canvases.shape[-1]
    boxes, scores = detect(detector, canvases)
    per_image = [image_block_boxes(size, b.numpy(), s.numpy(), levels, max_boxes) for b, s in zip(boxes, scores)]
    pad = torch.zeros(len(canvases), max_boxes, 4)
    pad[:, : boxes.shape[1]] = boxes[:, :max_boxes] * (scores[:, :max_boxes, None] > 0)
    return (torch.from_numpy(np.stack([p[0] for p in per_image])),
            torch.from_numpy(np.stack([p[1] for p in per_image])), pad)


def split_branches(feats: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block features ``(N, (1+J)*B, C)`` -> B-Net's ``(N, B, C)`` and F-Net's ``(N, J, B, C)``."""
    feats = feats.reshape(feats.shape[0], -1, blocks_upto(levels), feats.shape[-1])
    return feats[:, 0], feats[:, 1:]


@torch.no_grad()
def encode_images(canvases: torch.Tensor, encoder: BlockEncoder, detector: Detector | None,
                  levels: int, max_boxes: int):
    """Block features of both branches for a batch of canvases ``(N, 3, S, S)``."""
    block_boxes, mask, boxes = detect_blocks(canvases, detector, levels, max_boxes)
    return (*split_branches(encoder(canvases, block_boxes), levels), mask, boxes)


def state_digest(state: dict) -> str:
    """sha256 of a state_dict's names and tensor bytes (a cache key part: any changed weight
    changes it)."""
    h = hashlib.sha256()
    for name, value in state.items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(items: list[Item], parts: dict) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for it in items:
        h.update(str(it.image).encode())
    return h.hexdigest()[:16]


def cache_current(cache: Path, key: str) -> bool:
    """Whether the cache directory ``cache`` is complete and was made with ``key``."""
    return (cache / "key").is_file() and (cache / "key").read_text() == key


def compute_features(items: list[Item], encoder: BlockEncoder, detector: Detector | None, *,
                     image_size: int, levels: int, max_boxes: int, batch_size: int = 32,
                     dtype=np.float16, desc: str = "features") -> SplitFeatures:
    """Block features of ``items`` in memory (``dtype`` features)."""
    parts = {"bg": [], "fg": [], "mask": [], "boxes": []}
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        batch = items[start: start + batch_size]
        canvases = torch.from_numpy(np.stack([load_image(it.image, image_size) for it in batch]))
        bg, fg, mask, boxes = encode_images(canvases, encoder, detector, levels, max_boxes)
        parts["bg"].append(bg.numpy().astype(dtype))
        parts["fg"].append(fg.numpy().astype(dtype))
        parts["mask"].append(mask.numpy())
        parts["boxes"].append(boxes.numpy())
    return SplitFeatures(*(np.concatenate(parts[k]) for k in ("bg", "fg", "mask", "boxes")), canvas=image_size)


def extract_split(items: list[Item], encoder: BlockEncoder, detector: Detector | None, *,
                  image_size: int, levels: int, max_boxes: int, cache: Path, key: str,
                  batch_size: int = 32, desc: str = "features") -> SplitFeatures:
    """Features for ``items``, from ``cache`` when its key matches, else extracted (float16) and cached."""
    cache = Path(cache)
    if cache_current(cache, key):
        return load_split(cache, image_size)
    feats = compute_features(items, encoder, detector, image_size=image_size, levels=levels,
                             max_boxes=max_boxes, batch_size=batch_size, desc=desc)
    with atomic_dir(cache) as tmp:
        for name, array in zip(FILES,
                               (feats.background, feats.foreground, feats.fg_mask, feats.boxes)):
            np.save(tmp / f"{name}.npy", array)
        (tmp / "key").write_text(key)
    return load_split(cache, image_size)


def load_split(cache: Path, canvas: int) -> SplitFeatures:
    load = lambda name: np.load(cache / f"{name}.npy", mmap_mode="r")  # noqa: E731
    return SplitFeatures(load("bg"), load("fg"), load("mask"), load("boxes"), canvas)
