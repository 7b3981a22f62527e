"""What a search server does apart from its transport: batched text and image queries against one
gallery (shared by the built-in HTTP server and the Triton/PyTriton binding).

Each ``search_*`` method takes a micro-batch of queries and returns one answer per query, or an
exception in that query's slot (an empty caption fails alone, not its batch). A batch of ``n``
queries costs one text-encoder call (or ``n`` detector calls and one image-encoder call), one
first-stage call and ``n`` re-ranking scorer calls (:meth:`Searcher._rank`). Results do not
depend on how queries were batched (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fbnet.vocab import tokenize

from ..engine.ensemble import EnsembleRetriever
from ..engine.retriever import QueryError, Retriever
from ..gallery.gallery import Gallery
from ..search.searcher import Searcher, hits_json


@dataclass
class TextQuery:
    text: str
    top_k: int = 5
    shortlist: int | None = None
    nprobe: int | None = None  # IVF first stage: lists to visit (None: the index's default)


@dataclass
class ImageQuery:
    canvas: np.ndarray  # (3, S, S) float32 in [0, 1] (:func:`fbnet.preprocess.load_image`)
    top_k: int = 5
    shortlist: int | None = None
    name: str = "<upload>"
    nprobe: int | None = None


class SearchService:
    """Text and image queries against one gallery. Not thread-safe: one worker calls it."""

    def __init__(self, retriever: Retriever | EnsembleRetriever, gallery: Gallery, shortlist: int,
                 rerank_lanes: int = 0):
        """``rerank_lanes`` > 1: re-rank a batch's queries in parallel on that many single-threaded
        ONNX Runtime sessions (:class:`Searcher`); needs the ONNX Runtime CPU backend."""
        self.retriever, self.gallery = retriever, gallery
        lanes = [retriever.lane() for _ in range(rerank_lanes)] if rerank_lanes > 1 else []
        lanes = lanes if all(lanes) else []
        self.searcher = Searcher.for_gallery(retriever, gallery, shortlist, lanes)

    @property
    def backend(self) -> str:
        return self.retriever.backend.name

    def warm(self) -> None:
        """Create every session and both first stages now, so the first real query pays neither."""
        n = max(2, len(self.searcher.lanes))  # a batch: every re-rank lane too
        if self.gallery.images:
            self.search_texts([TextQuery("warm up", 1)] * n)
        if self.gallery.captions:
            size = self.retriever.bundle.canvas
            self.search_images([ImageQuery(np.zeros((3, size, size), np.float32), 1)] * n)

    def info(self) -> dict:
        stage = self.searcher.image_stage or self.searcher.text_stage
        return {"backend": self.backend, "images": len(self.gallery.images),
                "captions": len(self.gallery.captions), "shortlist": self.searcher.shortlist,
                "first_stage": stage.backend if stage else None, "rerank_lanes": len(self.searcher.lanes)}

    def search_texts(self, queries: list[TextQuery]) -> list[dict | Exception]:
        """Rank the gallery's images for each caption."""
        out: list[dict | Exception] = [None] * len(queries)
        ok = []
        for i, q in enumerate(queries):
            if not self.gallery.images:
                out[i] = QueryError("the gallery has no images to rank for a text query")
            elif not tokenize(q.text):
                out[i] = QueryError(f"empty caption {q.text!r}: a caption needs at least one word")
            else:
                ok.append(i)
        if ok:
            feats = self.retriever.encode_texts([queries[i].text for i in ok])
            hits = self.searcher.images_for(feats, [queries[i].top_k for i in ok], [queries[i].shortlist for i in ok],
                                            [queries[i].nprobe for i in ok])
            for i, h in zip(ok, hits):
                out[i] = hits_json(queries[i].text, "text", h, self.gallery.images, "image")
        return out

    def search_images(self, queries: list[ImageQuery]) -> list[dict | Exception]:
        """Rank the gallery's captions for each decoded image."""
        if not self.gallery.captions:
            return [QueryError("the gallery has no captions to rank for an image query") for _ in queries]
        feats = self.retriever.encode_canvases(np.stack([q.canvas for q in queries]))
        hits = self.searcher.texts_for(feats, [q.top_k for q in queries], [q.shortlist for q in queries],
                                       [q.nprobe for q in queries])
        return [hits_json(q.name, "image", h, self.gallery.captions, "caption") for q, h in zip(queries, hits)]
