"""Gallery search: exhaustive, or two-stage (a pooled first stage, then FB-Net's fused score).

Exhaustive search scores the query against every gallery item with the scorer graph (eqs. 13-15
for all six branch-level matrices, fused by eq. 7), so its cost grows with the gallery.

Two-stage search:

1. *First stage*: one pooled, unit-length embedding per image and per caption, ranked by inner
   product over the whole gallery (:mod:`fbnet.runtime.gallery.first_stage`: exact for small galleries,
   a FAISS IVF index saved with a large gallery, ``nprobe`` settable per query). The embedding is the level-1 block of the first branch (B-Net: the
   whole image; F-Net: the mean of the box blocks) and the level-1 text window (the whole
   caption). For ``K = M = 1`` eqs. (13)-(15) reduce to ``S_1 = 2 cos(v, e)``, so with B-Net the
   first stage ranks exactly by the trained matrix ``S^B_1`` and needs no extra graph: the
   gallery already stores these vectors.
2. *Re-ranking*: the top ``shortlist`` items (default 100) are scored with the fused
   cross-attention score; items outside the shortlist are not returned. When the shortlist
   covers the gallery the result is exhaustive search's (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..engine.features import ImageFeatures, TextFeatures
from ..engine.retriever import Retriever
from ..gallery.first_stage import FirstStage, pooled_images, pooled_texts

DEFAULT_SHORTLIST = 100


@dataclass
class Hits:
    """One query's result: gallery indices and fused scores, best first."""

    index: np.ndarray
    score: np.ndarray


def _best(scores: np.ndarray, candidates: np.ndarray, top_k: int) -> Hits:
    order = np.argsort(-scores, kind="stable")[:top_k]
    return Hits(candidates[order], scores[order])


class Searcher:
    """Searches a gallery's images for caption queries and its captions for image queries.

    ``shortlist`` is the two-stage re-ranking depth K; ``shortlist=0`` searches exhaustively. Each
    side's first stage is built on its first two-stage query (exhaustive search never needs it).

    ``lanes``: retrievers whose backends may run at the same time (e.g. single-threaded ONNX
    Runtime sessions, one per core). The re-ranks of several queries are then split among them
    and run in parallel; one query's re-rank, or a searcher without lanes, uses ``retriever``.
    Small scorer calls use two threads poorly: on 2 cores, eight 100 x 1 re-ranks took 39 ms on
    one two-thread session and 24 ms on two one-thread sessions side by side.
    """

    def __init__(self, retriever: Retriever, images: ImageFeatures | None, texts: TextFeatures | None,
                 shortlist: int = DEFAULT_SHORTLIST, use_faiss: bool | None = None,
                 lanes: Sequence[Retriever] = (), image_stage: FirstStage | None = None,
                 text_stage: FirstStage | None = None, stage_key: str | None = None):
        """``image_stage`` / ``text_stage``: first-stage indexes saved with the gallery (IVF); when
        absent, an exact one is built from the gallery on its first two-stage query. ``stage_key``:
        the key the first stage ranks (the gallery's ``first_stage_key``; default: a new gallery's,
        :func:`~fbnet.runtime.gallery.first_stage.first_stage_key`)."""
        self.retriever, self.images, self.texts, self.shortlist = retriever, images, texts, shortlist
        self.stage_key = stage_key
        self.use_faiss, self.lanes = use_faiss, list(lanes)
        self._stages = {"images": image_stage, "texts": text_stage}
        self._lane_pool = ThreadPoolExecutor(len(self.lanes), "fbnet-rerank") if len(self.lanes) > 1 else None

    @classmethod
    def for_gallery(cls, retriever: Retriever, gallery, shortlist: int = DEFAULT_SHORTLIST,
                    lanes: Sequence[Retriever] = ()) -> "Searcher":
        """A searcher over an opened gallery (one, sharded or an ensemble's), with the first-stage
        indexes saved with it and the key they rank."""
        return cls(retriever, gallery.image_features, gallery.text_features, shortlist, lanes=lanes,
                   image_stage=gallery.first_stage("images"), text_stage=gallery.first_stage("texts"),
                   stage_key=gallery.first_stage_key)

    @cached_property
    def image_stage(self) -> FirstStage | None:
        has = self.images is not None and len(self.images)
        if self._stages["images"] is not None:
            return self._stages["images"]
        return FirstStage(pooled_images(self.images, self.stage_key), self.use_faiss) if has else None

    @cached_property
    def text_stage(self) -> FirstStage | None:
        has = self.texts is not None and len(self.texts)
        if self._stages["texts"] is not None:
            return self._stages["texts"]
        return FirstStage(pooled_texts(self.texts, self.stage_key), self.use_faiss) if has else None

    def images_for(self, queries: TextFeatures, top_k: PerQuery, shortlist: PerQuery | None = None,
                   nprobe: PerQuery | None = None) -> list[Hits]:
        """Rank the gallery's images for each caption query."""
        return self._rank(queries, pooled_texts, self.images, lambda: self.image_stage,
                          lambda r, q, g: r.score(g, q).T, top_k, shortlist, nprobe)

    def texts_for(self, queries: ImageFeatures, top_k: PerQuery, shortlist: PerQuery | None = None,
                  nprobe: PerQuery | None = None) -> list[Hits]:
        """Rank the gallery's captions for each image query."""
        return self._rank(queries, pooled_images, self.texts, lambda: self.text_stage,
                          lambda r, q, g: r.score(q, g), top_k, shortlist, nprobe)

    def _rank(self, queries, pool, gallery, stage, score, top_k: PerQuery, shortlist: PerQuery | None,
              nprobe: PerQuery | None = None) -> list[Hits]:
        """``score(retriever, queries, items)`` is the fused score matrix ``(queries, items)``. ``top_k``,
        ``shortlist`` and ``nprobe`` are one value for every query or one per query (a micro-batch
        mixes them): exhaustive queries are scored together, and one first-stage call serves all
        the others that share an ``nprobe``."""
        n = len(queries)
        tops = _per_query(top_k, n)
        ks = [self.shortlist if k is None else k for k in _per_query(shortlist, n)]
        probes = _per_query(nprobe, n)
        out: list[Hits | None] = [None] * n
        exhaustive = [q for q in range(n) if not ks[q]]
        if exhaustive:
            for q, row in zip(exhaustive, score(self.retriever, queries.take(exhaustive), gallery)):
                out[q] = _best(row, np.arange(len(row)), tops[q])
        staged = [q for q in range(n) if ks[q]]
        if staged:
            # ascending reads are kind to memory-mapped galleries
            jobs = []
            for probe in dict.fromkeys(probes[q] for q in staged):
                group = [q for q in staged if probes[q] == probe]
                _, cand = stage().top(pool(queries.take(group), self.stage_key), max(ks[q] for q in group), probe)
                jobs += [(q, np.sort(idx[: ks[q]][idx[: ks[q]] >= 0])) for q, idx in zip(group, cand)]

            def rerank(retriever: Retriever, lane_jobs: list) -> None:
                for q, idx in lane_jobs:
                    row = score(retriever, queries.take(slice(q, q + 1)), gallery.take(idx))[0]
                    out[q] = _best(row, idx, tops[q])

            if self._lane_pool is not None and len(jobs) > 1:
                n_lanes = len(self.lanes)
                list(self._lane_pool.map(rerank, self.lanes, [jobs[i::n_lanes] for i in range(n_lanes)]))
            else:
                rerank(self.retriever, jobs)
        return out


PerQuery = int | Sequence[int | None] | None


def _per_query(value: PerQuery, n: int) -> list:
    if value is None or isinstance(value, (int, np.integer)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{len(value)} values for {n} queries")
    return list(value)


def hits_json(query: str, qtype: str, hits: Hits, items: list[str], returns: str) -> dict:
    """A query's hits as JSON (what the CLI prints with --json and the server answers)."""
    return {"query": str(query), "type": qtype, "returns": returns,
            "hits": [{"rank": r + 1, "score": float(s), "index": int(i), returns: items[i]}
                     for r, (i, s) in enumerate(zip(hits.index, hits.score))]}
