"""The serving pipeline: chain the bundle's graphs for images, captions and scores (no torch).

Images: decode + resize to the canvas (:mod:`fbnet.preprocess`), ``detector`` (one image at a
time: its input is static), window boxes of both branches (:mod:`fbnet.windows`, the code
training used), then ``image_encoder`` in batches (on the images, or on the detector's last maps
where the two share MobileNetV2's layers). Captions: the bundle's vocabulary, then
``text_encoder`` in batches. Scores: ``scorer`` over chunks of images x captions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fbnet.errors import FbnetError
from fbnet.preprocess import load_image
from fbnet.vocab import tokenize
from fbnet.windows import blocks_upto, image_block_boxes

from .backends import Backend, OnnxRuntimeBackend
from .bundle import Bundle
from .features import ImageFeatures, TextFeatures, as_float32, concat_images, real_units


class QueryError(FbnetError, ValueError):
    """A query is unusable (an empty caption, an unreadable image); the message says which."""


#: What one scorer call's fixed cost (ONNX Runtime's per-node dispatch over the six keys' small
#: tensors) is worth in padded box slots (image x caption x box): ``benchmarks/retrieval.py
#: --sections calls`` fitted 19 to 48 over three runs on 2 CPU cores (BENCHMARKS.md, "Scorer calls").
SCORER_CALL_COST = 48


class Retriever:
    def __init__(self, bundle: Bundle, backend: Backend, batch_size: int = 16, text_batch_size: int = 64,
                 max_pairs: int = 4096, max_items: int = 2048, call_cost: int = SCORER_CALL_COST):
        self.bundle, self.backend = bundle, backend
        #: images / captions per encoder call; image x caption pairs per scorer call and images or
        #: captions per scorer call (together they bound its memory, whatever the gallery's size)
        self.batch_size, self.text_batch_size = batch_size, text_batch_size
        self.max_pairs, self.max_items = max_pairs, max_items
        #: box slots (image x caption x box) one scorer call's fixed cost is worth (see ``box_groups``)
        self.call_cost = call_cost
        self.keys = bundle.keys
        m = bundle.model
        self.levels, self.max_boxes, self.max_words = m.levels, m.max_boxes, m.max_words
        #: keys whose text units are words: padded to ``max_words`` so every caption's array has one shape
        self.word_keys = set(m.word_keys)
        #: windows M of the largest key (level 3)
        self.max_windows = self.levels ** 2
        #: each graph's inputs: a model without F-Net keys has no ``fg_mask`` in its scorer
        self.inputs = {name: {i.name for i in spec.inputs} for name, spec in bundle.manifest.graphs.items()}
        #: whether the scorer graphs take any box count (bundles exported before that take exactly J)
        self.dynamic_boxes = takes_any_box_count(bundle.graph("scorer")) and "F1" in self.keys
        #: whether the image encoder takes any box count (bundles exported before that take exactly J)
        self.encoder_cuts_boxes = takes_any_box_count(bundle.graph("image_encoder"))
        #: whether the image encoder starts from the detector's last map instead of the image
        #: (a distilled MobileNetV2 head sharing its layers: ``fbnet.export.graphs.shared_stage``)
        self.shares_lower = "lower" in self.inputs["image_encoder"]

    def lane(self) -> Retriever | None:
        """This retriever on one-thread ONNX Runtime CPU sessions (a re-rank lane of
        :class:`~fbnet.runtime.search.searcher.Searcher`), or None on another backend."""
        backend = self.backend
        if not isinstance(backend, OnnxRuntimeBackend) or backend.providers[0] != "CPUExecutionProvider":
            return None
        return Retriever(self.bundle, OnnxRuntimeBackend(self.bundle, threads=1), self.batch_size,
                         self.text_batch_size, self.max_pairs, self.max_items, self.call_cost)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run ``graph`` on the feeds it declares (the others are dropped)."""
        return self.backend.run(graph, {k: v for k, v in feeds.items() if k in self.inputs[graph]})

    # -- images -------------------------------------------------------------------------
    def detect(self, canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._detect(canvas)[:2]

    def _detect(self, canvas: np.ndarray) -> tuple[np.ndarray, ...]:
        """Boxes ``(J, 4)`` and scores ``(J,)`` on one canvas, and the detector's last map ``(1, C,
        h, w)`` when the image encoder starts from it (``lower``)."""
        if self.bundle.graph("detector") is None:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        boxes, scores, *lower = self.backend.run("detector", {"image": canvas[None]})
        return (boxes[0], scores[0], *lower)

    def image_encoder_feeds(self, canvases: np.ndarray) -> dict[str, np.ndarray]:
        """Detect, then lay both branches' window boxes: the ``image_encoder`` inputs for ``canvases``,
        cut to the box slots the batch uses (at least one) where the graph takes any count: empty
        slots would be pooled, projected and sorted for nothing (a third of the image encoder's time
        on a Flickr8k photo, BENCHMARKS "Image query: detector input size")."""
        size = canvases.shape[-1]
        found = [self._detect(c) for c in canvases]
        per = [image_block_boxes(size, f[0], f[1], self.levels, self.max_boxes) for f in found]
        block_boxes, fg_mask = np.stack([p[0] for p in per]), np.stack([p[1] for p in per])
        if self.encoder_cuts_boxes:
            used = max(1, int(fg_mask.sum(axis=1).max()))  # real boxes come first
            block_boxes = block_boxes[:, : (1 + used) * blocks_upto(self.levels)]
            fg_mask = fg_mask[:, :used]
        first = {"lower": np.concatenate([f[2] for f in found])} if self.shares_lower else \
            {"image": canvases.astype(np.float32)}
        return {**first, "block_boxes": as_float32(block_boxes), "fg_mask": as_float32(fg_mask)}

    def encode_canvases(self, canvases: np.ndarray) -> ImageFeatures:
        return self.encode_feeds(self.image_encoder_feeds(canvases))

    def encode_feeds(self, feeds: dict[str, np.ndarray]) -> ImageFeatures:
        """``image_encoder`` on feeds from :meth:`image_encoder_feeds`, padded back to the bundle's J
        box slots (what galleries store and the scorer's groups cut from)."""
        return self.image_features(self.run("image_encoder", feeds), feeds["fg_mask"])

    def image_features(self, outs: list[np.ndarray], fg_mask: np.ndarray) -> ImageFeatures:
        """The image encoder's outputs (one per key) as features padded to the bundle's J box slots."""
        return ImageFeatures(dict(zip(self.keys, outs)), fg_mask).pad_boxes(self.max_boxes)

    @property
    def boxes_key(self) -> tuple:
        """What decides :meth:`image_encoder_feeds`: the detector graph (its sha256), the window
        layout, whether the feeds are cut to the used box slots and whether they carry the
        detector's map. Retrievers with equal keys make the same feeds from a canvas."""
        detector = self.bundle.graph("detector")
        return (self.bundle.manifest.files.get(detector.file) if detector else None, self.levels, self.max_boxes,
                self.encoder_cuts_boxes, self.shares_lower)

    def encode_images(self, paths: list[str | Path]) -> ImageFeatures:
        batches = canvas_batches(paths, self.bundle.canvas, self.batch_size)
        return concat_images([self.encode_canvases(c) for c in batches])

    # -- captions -----------------------------------------------------------------------
    def encode_texts(self, captions: list[str]) -> TextFeatures:
        for c in captions:
            if not tokenize(c):
                raise QueryError(f"empty caption {c!r}: a caption needs at least one word")
        parts, step = [], self.text_batch_size
        for start in range(0, len(captions), step):
            ids, lengths = self.bundle.vocab.encode_batch(captions[start: start + step], self.max_words)
            outs = self.backend.run("text_encoder", {"ids": ids, "lengths": lengths})
            outs = [pad_words(o, self.max_words) if k in self.word_keys else o for k, o in zip(self.keys, outs)]
            parts.append(TextFeatures(dict(zip(self.keys, outs))))
        return TextFeatures({k: np.concatenate([p.windows[k] for p in parts]) for k in self.keys})

    # -- scores -------------------------------------------------------------------------
    def score(self, images: ImageFeatures, texts: TextFeatures, per_key: bool = False):
        """Fused similarity ``(I, C)`` (eq. 7), and the per-key matrices when ``per_key``. Pairs go
        to the scorer in memory-bounded chunks; within a chunk, images are grouped by box count and
        each group is cut to its count, so padded box slots cost nothing (exact: masked blocks never
        enter eqs. 13-15)."""
        n_img, n_cap = len(images), len(texts)
        outs = [np.zeros((n_img, n_cap), np.float32) for _ in range(1 + len(self.keys) if per_key else 1)]
        for isl, csl in pair_chunks(n_img, n_cap, self.max_pairs, self.max_items):
            im, tx = images.take(isl), texts.take(csl)
            windows = {f"windows_{k}": as_float32(cut_words(tx.windows[k]) if k in self.word_keys else tx.windows[k])
                       for k in self.keys}
            groups = im.box_groups(csl.stop - csl.start, self.call_cost) if self.dynamic_boxes else \
                [(slice(None), self.max_boxes)]
            for rows, boxes in groups:
                feeds = {**im.group_feeds(rows, boxes), **windows}
                k_largest = self.max_windows * (boxes if "F1" in self.keys else 1)  # K of the largest key
                few = (csl.stop - csl.start) * self.max_windows < k_largest
                got = self.run("reranker" if few and self.bundle.graph("reranker") else "scorer", feeds)
                for out, value in zip(outs, got):
                    out[isl, csl][rows] = value
        return (outs[0], dict(zip(self.keys, outs[1:]))) if per_key else outs[0]


def takes_any_box_count(graph) -> bool:
    """Whether ``graph`` (a manifest ``GraphSpec``) names its ``fg_mask`` box axis, i.e. takes any box count."""
    fg = graph.input("fg_mask")
    return fg is not None and isinstance(fg.shape[1], str)


def canvas_batches(paths: list[str | Path], canvas: int, batch_size: int):
    """The photos at ``paths`` decoded and resized to the canvas, ``batch_size`` at a time."""
    for start in range(0, len(paths), batch_size):
        yield np.stack([load_image(p, canvas) for p in paths[start: start + batch_size]])


def pair_chunks(n_img: int, n_cap: int, max_pairs: int, max_items: int):
    """``(image slice, caption slice)`` blocks that tile ``n_img x n_cap`` with at most ``max_pairs``
    pairs and ``max_items`` images or captions each (what bounds the scorer's memory)."""
    cap_chunk = max(1, min(n_cap, max_pairs, max_items))
    img_chunk = max(1, min(max_pairs // cap_chunk, max_items))
    for i in range(0, n_img, img_chunk):
        for c in range(0, n_cap, cap_chunk):
            yield slice(i, min(i + img_chunk, n_img)), slice(c, min(c + cap_chunk, n_cap))


def pad_words(words: np.ndarray, length: int) -> np.ndarray:
    """Word units ``(N, L, d)`` zero-padded to ``length`` words."""
    return np.pad(words, ((0, 0), (0, length - words.shape[1]), (0, 0))) if words.shape[1] < length else words


def cut_words(words: np.ndarray) -> np.ndarray:
    """Word units cut to the longest caption among these rows (the rest is padding for all)."""
    words = np.asarray(words)
    return words[:, : max(1, int(real_units(words).max()))] if len(words) else words
