"""The first stage of two-stage search: top-k by inner product over pooled unit vectors.

Small galleries use an exact flat index (FAISS ``IndexFlatIP`` when ``faiss`` is installed, else
numpy). Alone, numpy's product is faster (0.95 against 2.08 ms for one query over 10,000 x 512 on 2
cores, the same top k), but its OpenBLAS threads spin after the call and slow what runs next: an
image query with the recipe's bundle at 10,000 items took 88 ms with it against 59 ms with FAISS,
A/B in one process. So FAISS stays the default. Large ones use a FAISS inverted-file index, chosen
from the gallery's size and a memory budget in the manner of autofaiss (a reconstruction of its
rule of thumb, not its code):

* fewer than :data:`FLAT_LIMIT` vectors: ``Flat`` (exact);
* else ``IVF<nlist>,Flat`` with ``nlist`` the power of two nearest ``4 sqrt(n)`` (4,096 lists
  at 1M), when the full vectors fit the budget;
* else ``IVF<nlist>,PQ<m>``: product-quantized vectors of ``m`` bytes, the largest ``m`` whose
  codes fit the budget;
* ``HNSW32`` on request (no training, more memory: a graph of 32 links per vector).

IVF indexes are trained (k-means) at index time on at most ``40 nlist`` vectors, saved beside
the gallery's arrays (``first_stage.faiss``) and searched with ``nprobe`` lists per query
(default :data:`DEFAULT_NPROBE`; settable per query). With ``nprobe = nlist`` an IVF-Flat index
returns the flat index's result.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fbnet.errors import FbnetError

from ..engine.features import ImageFeatures, MemberFeatures, TextFeatures

#: Below this many vectors the first stage is exact (one matrix product is fast enough).
FLAT_LIMIT = 100_000
#: Inverted lists visited per query unless a query says otherwise.
DEFAULT_NPROBE = 32
INDEX_FILE = "first_stage.faiss"


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def first_stage_key(keys: list[str]) -> str:
    """The key whose vectors a new gallery's first stage ranks: the pooled global branch ``G1``
    when the model has one, else B-Net's level 1, else F-Net's. On Flickr8k dev (the recipe's
    scores), ``G1`` alone reaches R@sum 265.0 against ``B1``'s 260.5, and its top 100 hold 99.98% /
    100.00% of the fused score's top 10 (i2t / t2i) against 99.85% / 99.99% (BENCHMARKS.md,
    "Two-stage quality (Flickr8k dev)")."""
    return "G1" if "G1" in keys else legacy_first_stage_key(keys)


def legacy_first_stage_key(keys: list[str]) -> str:
    """The key of galleries indexed before ``G1`` led the first stage (their gallery.json names none)."""
    return "B1" if "B1" in keys else "F1"


def recorded_first_stage_key(meta) -> str:
    """The key a gallery's first stage was built on: the one its gallery.json (a ``GalleryMeta``)
    records, else the rule of the fbnet that wrote it (:func:`legacy_first_stage_key`)."""
    return meta.first_stage_key or legacy_first_stage_key(list(meta.keys))


def pooled_images(feats: ImageFeatures | MemberFeatures, key: str | None = None) -> np.ndarray:
    """First-stage image embeddings ``(N, d)`` from ``key`` (default :func:`first_stage_key`): its
    one block (``G1``, ``B1``), or F-Net's level-1 blocks averaged over real boxes (an ensemble's:
    its first member's)."""
    feats = feats.lead if isinstance(feats, MemberFeatures) else feats
    key = key or first_stage_key(list(feats.blocks))
    blocks = np.asarray(feats.blocks[key], dtype=np.float32)
    if key != "F1":
        return _unit(blocks[:, 0])
    mask = np.asarray(feats.fg_mask, dtype=np.float32)[:, :, None]
    return _unit((blocks * mask).sum(axis=1))


def pooled_texts(feats: TextFeatures | MemberFeatures, key: str | None = None) -> np.ndarray:
    """First-stage caption embeddings ``(N, d)``: ``key``'s first text window (the whole caption,
    or the pooled caption for ``G1``; an ensemble's: its first member's)."""
    feats = feats.lead if isinstance(feats, MemberFeatures) else feats
    return _unit(feats.windows[key or first_stage_key(list(feats.windows))][:, 0])


class FirstStageError(FbnetError, ValueError):
    """A first-stage index file is unreadable or does not match its gallery, or no index fits the
    memory budget; the message names it."""

    http_status = 500  # the server's own files


def choose_spec(n: int, d: int, memory_budget: int | None = None, kind: str = "auto") -> str:
    """The FAISS ``index_factory`` string for ``n`` vectors of ``d`` dims (see the module doc).
    ``kind``: ``auto``, ``flat``, ``ivf`` (IVF-Flat or IVF-PQ by the budget) or ``hnsw``."""
    if kind not in ("auto", "flat", "ivf", "hnsw"):
        raise FirstStageError(f"first stage must be auto, flat, ivf or hnsw, not {kind!r}")
    if kind == "flat" or (kind == "auto" and n < FLAT_LIMIT):
        return "Flat"
    if kind == "hnsw":
        return "HNSW32"
    nlist = max(1, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    nlist = min(nlist, max(1, n // 39))  # k-means wants about 39 points per list
    if memory_budget is None or n * d * 4 <= memory_budget:
        return f"IVF{nlist},Flat"
    for m in (64, 32, 16, 8, 4):
        if d % m == 0 and n * m <= memory_budget:
            return f"IVF{nlist},PQ{m}"
    raise FirstStageError(f"{n:,} vectors do not fit a first-stage budget of {memory_budget:,} bytes even at 4 bytes "
                          "each (--first-stage-memory)")


class FirstStage:
    """Maximum-inner-product top-k over ``vectors`` (unit length, ``(N, d)``)."""

    def __init__(self, vectors: np.ndarray | None = None, use_faiss: bool | None = None, spec: str = "Flat",
                 index=None, seed: int = 0):
        self.spec, self.faiss, self.vectors = spec, index, None
        if index is not None:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if spec == "Flat" and use_faiss is not True:
            try:
                import faiss
            except ImportError:
                if use_faiss:
                    raise
                faiss = None
            if faiss is None or use_faiss is False:
                self.vectors = vectors
                return
        import faiss

        index = faiss.index_factory(vectors.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            ivf = faiss.extract_index_ivf(index)
            rng = np.random.default_rng(seed)
            sample = vectors if len(vectors) <= 40 * ivf.nlist else vectors[np.sort(rng.choice(len(vectors), 40 * ivf.nlist, replace=False))]
            ivf.cp.seed = seed
            index.train(sample)
        index.add(vectors)
        _set_nprobe(index, DEFAULT_NPROBE)
        self.faiss = index

    @property
    def backend(self) -> str:
        return "numpy" if self.faiss is None else f"faiss {self.spec}"

    def __len__(self) -> int:
        return len(self.vectors) if self.faiss is None else self.faiss.ntotal

    def save(self, path: Path) -> None:
        import faiss

        from fbnet.atomic import atomic_write

        if self.faiss is None:
            raise ValueError("a numpy first stage is rebuilt from the gallery, not saved")
        atomic_write(Path(path), lambda fh: fh.write(faiss.serialize_index(self.faiss).tobytes()))

    @classmethod
    def load(cls, path: Path, expected: int, spec: str) -> "FirstStage":
        """A saved index, read straight from the file (a 1,000,000-image IVF-Flat index: 1.7 s and
        2.1 GB; reading the file into a buffer first took 20.8 s and peaked at 6.2 GB); ``expected``
        is the gallery's item count (a mismatch is refused)."""
        path = Path(path)
        try:
            import faiss
        except ImportError:
            raise FirstStageError(f"{path}: this gallery's first stage needs faiss "
                                  "(pip install 'fbnet[search]')") from None
        try:  # read straight from the file (no second in-memory copy of a multi-GB index)
            index = faiss.read_index(str(path))
        except Exception as exc:  # FAISS raises RuntimeError with its C++ message
            raise FirstStageError(f"{path}: unreadable first-stage index ({str(exc).splitlines()[0][:200]}); "
                                  "re-run `fbnet-serve-cli index`") from None
        if index.ntotal != expected:
            raise FirstStageError(f"{path}: holds {index.ntotal:,} vectors but the gallery has {expected:,} items")
        _set_nprobe(index, DEFAULT_NPROBE)
        return cls(spec=spec, index=index)

    def top(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and indices ``(Q, k)`` of the ``k`` best items per query, best first. ``nprobe``:
        inverted lists to visit (IVF; ``efSearch`` for HNSW); ignored by exact indexes."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if self.faiss is not None:
            params = _search_params(self.faiss, nprobe)
            return self.faiss.search(queries, k, params=params) if params is not None else self.faiss.search(queries, k)
        scores = queries @ self.vectors.T
        if k < len(self):
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(len(self)), scores.shape)
        top = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -top), axis=1)  # best first; ties by gallery order
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1)


def _set_nprobe(index, nprobe: int) -> None:
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return
    ivf.nprobe = min(nprobe, ivf.nlist)


def _search_params(index, nprobe: int | None):
    import faiss

    if nprobe is None:
        return None
    try:
        faiss.extract_index_ivf(index)
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    except RuntimeError:
        pass
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=int(nprobe))
    return None
