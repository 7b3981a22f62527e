"""What training, evaluation and parity share: the frozen stages and split scoring.

:func:`build_frozen` turns a config (and optionally a checkpoint's saved states) into the
detector and block encoder; :func:`split_features` extracts or loads a split's cached block
features; :class:`Captions` holds a split's encoded captions; :func:`score_split` computes the
per-(branch, level) similarity matrices of a split in memory-bounded chunks.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, FBNetConfig
from .data.manifest import Item
from .activations import FILES as ACTIVATION_FILES
from .activations import ActivationFeatures, activation_key, extract_activations
from .atomic import atomic_dir
from .augment import drop_words
from .distributed import Group
from .features import FILES as FEATURE_FILES
from .features import SplitFeatures, cache_current, cache_key, extract_split, state_digest
from .models.backbone import BlockEncoder
from .models.detector import build_detector
from .models.fbnet import FBNet
from .vocab import Vocabulary


def build_frozen(cfg: FBNetConfig, num_box_classes: int, detector_state=None, encoder_state=None):
    """Detector and block encoder for ``cfg``; saved states (from a checkpoint) override weights."""
    m = cfg.model
    detector = build_detector(m.detector, num_box_classes, m.backbone.image_size)
    if detector is not None and detector_state is not None:
        detector.load_state_dict(detector_state)
    trunk = None
    if m.backbone.name == "detector":
        if detector is None or not hasattr(detector.trunk, "stride"):
            raise ConfigError("model.backbone.name 'detector' needs model.detector.name: fasterrcnn_light")
        trunk = detector.trunk
    encoder = BlockEncoder(m.backbone, seed=cfg.train.seed, trunk=trunk)
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    if detector is not None:
        detector.eval()
    return detector, encoder


def frozen_from_checkpoint(cfg: FBNetConfig, ckpt: dict):
    """The detector and block encoder saved in a checkpoint (see :func:`build_frozen`)."""
    return build_frozen(cfg, len(ckpt.get("box_classes") or []), ckpt["detector"], ckpt["encoder"])


def feature_cache(cfg: FBNetConfig, run_dir: Path) -> Path:
    """Where a run's block features are cached: ``data.feature_cache`` or ``<run>/features``."""
    return Path(cfg.data.feature_cache) if cfg.data.feature_cache else Path(run_dir) / "features"


def frozen_settings(cfg: FBNetConfig) -> dict:
    """The config that changes cached features: the head (embed_dim, branches, attention) may differ.
    The detector's default input size and the backbone's default output stride are left out, so
    caches written before those options existed keep their keys."""
    settings = {k: v for k, v in cfg.to_dict()["model"].items() if k in ("backbone", "detector", "levels")}
    if not settings["detector"]["input_size"]:
        del settings["detector"]["input_size"]
    if settings["backbone"]["output_stride"] == 32:
        del settings["backbone"]["output_stride"]
    return settings


def split_features(cfg: FBNetConfig, items: list[Item], detector, encoder, cache: Path,
                   split: str, group: Group | None = None) -> SplitFeatures:
    m = cfg.model
    state = {"encoder": state_digest(encoder.state_dict()),
             "detector": state_digest(detector.state_dict()) if detector is not None else None}
    key = cache_key(items, {"model": frozen_settings(cfg), "weights": state})
    extract = lambda its, where: extract_split(  # noqa: E731
        its, encoder, detector, image_size=m.backbone.image_size, levels=m.levels,
        max_boxes=m.detector.max_boxes, cache=where, key=key, desc=f"features[{split}]")
    return sharded(extract, items, cache / split, key, FEATURE_FILES, group)


def split_activations_for(cfg: FBNetConfig, items: list[Item], detector, encoder, cache: Path, split: str,
                          views: tuple[str, ...], group: Group | None = None) -> ActivationFeatures:
    """A split's cached lower-trunk activations (:mod:`fbnet.activations`), for fine-tuning."""
    m = cfg.model
    key = activation_key(items, encoder, detector, frozen_settings(cfg), views)
    extract = lambda its, where: extract_activations(  # noqa: E731
        its, encoder, detector, image_size=m.backbone.image_size, levels=m.levels,
        max_boxes=m.detector.max_boxes, views=views, cache=where, key=key, desc=f"activations[{split}]")
    lower, blocks, mask = sharded(extract, items, cache / "activations" / split, key, ACTIVATION_FILES, group)
    return ActivationFeatures(lower, blocks, mask, encoder, m.levels, m.backbone.image_size)


def sharded(extract, items: list[Item], cache: Path, key: str, files: tuple[str, ...], group: Group | None):
    """``extract(items, cache)`` with the work split over a torchrun group: each rank extracts its
    share into a cache of its own beside ``cache`` (resumable as any cache), then rank 0 joins
    the shares' arrays into ``cache`` and every rank loads it. A single process, or a cache that
    is already current, just calls ``extract``."""
    if group is None or cache_current(cache, key):
        return extract(items, cache)
    part = lambda r: cache.with_name(f".{cache.name}.{key}.rank{r}of{group.world}")  # noqa: E731
    extract(items[group.share(len(items))], part(group.rank))
    group.barrier()
    if group.main:
        with atomic_dir(cache) as tmp:
            for name in files:
                np.save(tmp / f"{name}.npy", np.concatenate(
                    [np.load(part(r) / f"{name}.npy", mmap_mode="r") for r in range(group.world)]))
            (tmp / "key").write_text(key)
        for r in range(group.world):
            shutil.rmtree(part(r), ignore_errors=True)
    group.barrier()
    return extract(items, cache)


@dataclass
class Captions:
    """A split's captions: padded ids ``(C, L)``, lengths, owning image index and labels."""

    ids: np.ndarray
    lengths: np.ndarray
    image: np.ndarray
    labels: np.ndarray | None
    image_labels: np.ndarray | None
    #: Training only: the share of words :meth:`tensors` drops (:mod:`fbnet.augment`), drawn from
    #: ``rng``; without an ``rng`` the captions are whole.
    word_dropout: float = 0.0
    rng: np.random.Generator | None = None

    @classmethod
    def from_items(cls, items: list[Item], vocab: Vocabulary, max_words: int, labelled: bool) -> "Captions":
        texts = [c for it in items for c in it.captions]
        owner = np.array([i for i, it in enumerate(items) for _ in it.captions])
        ids, lengths = vocab.encode_batch(texts, max_words)
        img_labels = np.array([it.label for it in items]) if labelled else None
        return cls(ids, lengths, owner, img_labels[owner] if labelled else None, img_labels)

    def first_per_image(self, n: int) -> "Captions":
        """The first ``n`` captions of every image (all when ``n`` is 0)."""
        if n <= 0:
            return self
        starts = np.r_[0, np.flatnonzero(np.diff(self.image)) + 1]
        rank = np.arange(len(self.image)) - np.repeat(starts, np.diff(np.r_[starts, len(self.image)]))
        keep = rank < n
        labels = self.labels[keep] if self.labels is not None else None
        return Captions(self.ids[keep], self.lengths[keep], self.image[keep], labels, self.image_labels)

    def tensors(self, index):
        lengths = self.lengths[index]
        width = int(lengths.max())
        ids = self.ids[index, :width]
        if self.rng is not None and self.word_dropout:
            ids, lengths = drop_words(ids, lengths, self.word_dropout, self.rng)
            ids = ids[:, :int(lengths.max())]
        return torch.from_numpy(ids), torch.from_numpy(lengths)


def cat_units(parts: list[torch.Tensor]) -> torch.Tensor:
    """Text units of several caption chunks as one ``(C, M, d)`` tensor: a word key's chunks
    differ in length and are zero-padded to the longest (padding is what the scorer masks)."""
    m = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, m - p.shape[1])) for p in parts])


@torch.no_grad()
def score_split(model: FBNet, feats: SplitFeatures, caps: Captions, chunk: int = 256):
    """Per-(branch, level) similarity matrices ``(images, captions)`` as float32 numpy arrays."""
    model.eval()
    device = next(model.parameters()).device
    n_img, n_cap = len(feats), len(caps.lengths)
    texts = {}
    for start in range(0, n_cap, chunk):
        enc = model.encode_texts(*(t.to(device) for t in caps.tensors(slice(start, start + chunk))))
        for key, v in enc.items():
            texts.setdefault(key, []).append(v)
    texts = {k: cat_units(v) for k, v in texts.items()}
    out = {key: np.zeros((n_img, n_cap), dtype=np.float32) for key in model.keys}
    img_chunk = max(1, chunk // 4)
    for start in range(0, n_img, img_chunk):
        sl = slice(start, min(start + img_chunk, n_img))
        images = model.encode_images(*(t.to(device) for t in feats.tensors(sl)))
        for cs in range(0, n_cap, chunk):
            csl = slice(cs, min(cs + chunk, n_cap))
            part = {k: texts[k][csl] for k in model.keys}
            for key, s in model.similarities(images, part).items():
                out[key][sl, csl] = s.cpu().numpy()
    return out
