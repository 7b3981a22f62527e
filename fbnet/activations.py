"""Cached activations of the backbone's frozen part, for fine-tuning its top
(``model.backbone.trainable_blocks``; :mod:`fbnet.models.backbone`).

Block features cannot be cached when the top of the backbone that makes them changes every step.
What is cached instead, once per image and view, is the frozen part's activation map
(MobileNetV2 with its last two modules trained, on a 224 px canvas: 160 x 7 x 7, 15.7 KB in
float16), with the window boxes of both branches (:func:`fbnet.features.detect_blocks`, from the
detector run once on the unflipped canvas) and the box mask. Each step then runs the top and
RoIAlign on the cached maps (:class:`ActivationFeatures`), which gives the block features the
full backbone gives for the same image (tested).

Views: ``identity`` and ``hflip`` (the canvas mirrored; every window box mirrored with it, so a
block covers the same content). Training samples one view per image and step; evaluation reads
``identity``.

A split's cache is a directory (``lower.npy``, ``blocks.npy``, ``mask.npy``, ``key``), filled in
place batch by batch (an interrupted extraction resumes) and renamed into place when complete.
Its key hashes the frozen part's and the detector's weights (bytes, not a summary), the settings
that change the maps and the images, so a cache made with another backbone state is never
reused: it is rebuilt.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_dir, atomic_write_text
from .data.manifest import Item
from .features import cache_current, cache_key, detect_blocks, split_branches, state_digest
from .models.backbone import BlockEncoder
from .models.detector import Detector
from .preprocess import load_image
from .windows import blocks_upto

FILES = ("lower", "blocks", "mask")


def view_canvases(canvases: torch.Tensor, view: str) -> torch.Tensor:
    return canvases.flip(-1) if view == "hflip" else canvases


def view_boxes(boxes: torch.Tensor, view: str, size: int) -> torch.Tensor:
    """Boxes ``(..., 4)`` (x1, y1, x2, y2 on a ``size`` canvas) as they lie in ``view``."""
    if view != "hflip":
        return boxes
    return torch.stack([size - boxes[..., 2], boxes[..., 1], size - boxes[..., 0], boxes[..., 3]], dim=-1)


@dataclass
class ActivationFeatures:
    """A split's cached activations, read as block features through ``encoder``'s top.

    ``tensors(index)`` gives what :meth:`fbnet.features.SplitFeatures.tensors` gives (B-Net
    blocks, F-Net blocks, box mask, F-Net region boxes), computed by the encoder's current top,
    with gradients when its parameters require them. With ``rng`` set (training) each image is
    read in a random cached view; else in the first (``identity``)."""

    lower: np.ndarray  # (N, V, C, h, w) float16
    blocks: np.ndarray  # (N, V, (1 + J) * B, 4) window boxes on the canvas
    fg_mask: np.ndarray  # (N, J) bool
    encoder: BlockEncoder
    levels: int
    canvas: int
    rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.fg_mask)

    def tensors(self, index):
        idx = np.arange(len(self))[index]
        views = (self.rng.integers(self.lower.shape[1], size=len(idx)) if self.rng is not None
                 else np.zeros(len(idx), dtype=np.int64))
        mask = np.array(self.fg_mask[idx])
        j = max(1, int(mask.sum(axis=1).max())) if len(mask) else mask.shape[1]
        nb = blocks_upto(self.levels)
        device = self.encoder.mean.device
        lower = torch.from_numpy(np.array(self.lower[idx, views])).to(device).float()
        boxes = torch.from_numpy(np.array(self.blocks[idx, views, : (1 + j) * nb])).to(device)
        background, foreground = split_branches(self.encoder.pool_blocks(lower, boxes), self.levels)
        regions = boxes.reshape(len(idx), 1 + j, nb, 4)[:, 1:, 0] / self.canvas
        return background, foreground, torch.from_numpy(mask[:, :j]).to(device), regions


@torch.no_grad()
def extract_activations(items: list[Item], encoder: BlockEncoder, detector: Detector | None, *,
                        image_size: int, levels: int, max_boxes: int, views: tuple[str, ...],
                        cache: Path, key: str, batch_size: int = 32,
                        desc: str = "activations") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lower, blocks, mask)`` of ``items``, from ``cache`` when its key matches, else computed.

    Arrays are written in place into ``.<cache>.<key>.partial/`` with a ``done`` count committed
    after every batch, so an interrupted extraction resumes where it stopped; the finished
    directory replaces ``cache`` in one rename."""
    cache = Path(cache)
    if not cache_current(cache, key):
        partial = cache.with_name(f".{cache.name}.{key}.partial")
        partial.mkdir(parents=True, exist_ok=True)
        done_file = partial / "done"
        done = int(done_file.read_text()) if done_file.is_file() else 0
        probe = encoder.lower(torch.zeros(1, 3, image_size, image_size))
        n, v, nb = len(items), len(views), (1 + max_boxes) * blocks_upto(levels)
        shapes = {"lower": ((n, v, *probe.shape[1:]), np.float16), "blocks": ((n, v, nb, 4), np.float32),
                  "mask": ((n, max_boxes), np.bool_)}
        arrays = {name: np.lib.format.open_memmap(partial / f"{name}.npy", mode="r+" if done else "w+",
                                                  dtype=dtype, shape=shape) for name, (shape, dtype) in shapes.items()}
        lower, blocks, mask = arrays["lower"], arrays["blocks"], arrays["mask"]
        for start in tqdm(range(done, n, batch_size), desc=desc, unit="batch",
                          total=len(range(0, n, batch_size)), initial=done // batch_size):
            sl = slice(start, min(start + batch_size, n))
            canvases = torch.from_numpy(np.stack([load_image(it.image, image_size) for it in items[sl]]))
            block_boxes, mask[sl], _ = detect_blocks(canvases, detector, levels, max_boxes)
            for i, view in enumerate(views):
                lower[sl, i] = encoder.lower(view_canvases(canvases, view)).numpy().astype(np.float16)
                blocks[sl, i] = view_boxes(block_boxes, view, image_size).numpy()
            for array in arrays.values():
                array.flush()
            atomic_write_text(done_file, str(sl.stop))
        del lower, blocks, mask, arrays
        with atomic_dir(cache) as tmp:
            for name in FILES:
                os.replace(partial / f"{name}.npy", tmp / f"{name}.npy")
            (tmp / "key").write_text(key)
        shutil.rmtree(partial, ignore_errors=True)
    load = lambda name: np.load(cache / f"{name}.npy", mmap_mode="r")  # noqa: E731
    return tuple(load(name) for name in FILES)


def activation_key(items: list[Item], encoder: BlockEncoder, detector: Detector | None, frozen_cfg: dict,
                   views: tuple[str, ...]) -> str:
    """The cache key: images, settings and the exact bytes of the frozen weights."""
    parts = {"model": frozen_cfg, "views": list(views), "lower": state_digest(encoder.lower_state()),
             "split_at": encoder.split_at,
             "detector": state_digest(detector.state_dict()) if detector is not None else None}
    return cache_key(items, parts)
