"""How a gallery stores its block and window features: plain arrays, or FAISS codes.

A re-ranked item needs every block of every level (FB-Net re-ranks with all of them), so a
gallery stores far more than one vector per item. Coded stores keep each block as a FAISS code and
decode only what a query re-ranks (the shortlist), into float32, re-normalised to unit length:

=============  ================================  ======================================
store          FAISS codec (``index_factory``)   bytes per d = 512 vector
=============  ================================  ======================================
``float32``    none                              2,048
``float16``    none                              1,024
``sq8``        ``SQ8`` (8 bits a dimension)      512
``sq4``        ``SQ4`` (4 bits a dimension)      256
``residual4``  ``IVF256,SQ4``: a k-means         2 + 256
               centroid, then 4 bits a dimension
               for the residual (ColBERTv2's
               scheme, with 4 bits where it
               uses 1-2)
``pq``         ``PQ<d/8>``: product quantizer,   64
               8-d sub-vectors, 256 centroids
               each (1 bit a dimension)
=============  ================================  ======================================

Coded stores keep only real blocks: F-Net's padded box slots cost no bytes (the codes of one
image's F-Net level-u blocks are ``count x u**2`` rows, located by an offsets array). The level-1
B-Net block (the first stage's vector) stays float16 in every coded store. Codecs are trained
(k-means) at index time on at most :data:`TRAIN_SAMPLE` vectors of each key and saved beside the
codes (``<key>.codec.faiss``). The ColBERTv2 comparison is a reconstruction in FAISS terms
(Santhanam et al. 2022 quantise residuals to 1-2 bits per dimension with their own code).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from fbnet.errors import FbnetError

from ..engine.features import row_index

PLAIN = ("float32", "float16")
CODED = {"sq8": "SQ8", "sq4": "SQ4", "residual4": "IVF256,SQ4", "pq": "PQ{m}"}
STORES = (*PLAIN, *CODED)
#: Vectors each codec is trained on (a seeded sample of the key's real blocks).
TRAIN_SAMPLE = 65_536
#: Keys kept as float16 in a coded store (the first stage's vectors).
UNCODED_KEYS = ("B1",)


class StoreError(FbnetError, ValueError):
    """A coded store's file is missing, truncated or corrupt; the message names it."""

    http_status = 500  # the server's own files


def codec_spec(store: str, d: int) -> str:
    if store not in CODED:
        raise StoreError(f"store must be one of {', '.join(STORES)}, not {store!r}")
    return CODED[store].format(m=d // 8)


def train_codec(store: str, vectors: np.ndarray, seed: int = 0):
    """A trained FAISS codec for ``vectors`` ``(n, d)`` float32."""
    import faiss

    d = vectors.shape[1]
    codec = faiss.index_factory(d, codec_spec(store, d), faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = vectors if len(vectors) <= TRAIN_SAMPLE else vectors[np.sort(rng.choice(len(vectors), TRAIN_SAMPLE, replace=False))]
    try:
        faiss.extract_index_ivf(codec).cp.seed = seed
    except RuntimeError:
        pass
    codec.train(np.ascontiguousarray(sample, dtype=np.float32))
    return codec


def write_coded(directory: Path, key: str, blocks: np.ndarray, counts: np.ndarray, store: str,
                chunk: int = 8192) -> dict:
    """Encode the real rows of ``blocks (N, K, d)`` (the first ``counts[i]`` of row i) into
    ``<key>.codes.npy``, ``<key>.offsets.npy`` and ``<key>.codec.faiss``, a chunk of items at a
    time (``blocks`` may be a memory map larger than RAM); return what gallery.json records."""
    import faiss

    from fbnet.atomic import atomic_write

    n, k, d = blocks.shape
    counts = np.asarray(counts, dtype=np.int64)
    slots = np.arange(k)[None, :]
    real_rows = lambda lo, hi: np.ascontiguousarray(  # noqa: E731
        np.asarray(blocks[lo:hi], dtype=np.float32)[slots < counts[lo:hi, None]])
    sample_items = np.sort(np.random.default_rng(0).choice(n, min(n, max(1, TRAIN_SAMPLE // max(1, k))), replace=False))
    sample = np.asarray(blocks[sample_items], dtype=np.float32)[slots < counts[sample_items, None]]
    codec = train_codec(store, sample)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    codes = np.lib.format.open_memmap(directory / f"{key}.codes.npy", mode="w+", dtype=np.uint8,
                                      shape=(int(offsets[-1]), codec.sa_code_size()))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        codes[offsets[lo]:offsets[hi]] = codec.sa_encode(real_rows(lo, hi))
    codes.flush()
    del codes
    np.save(directory / f"{key}.offsets.npy", offsets)
    atomic_write(directory / f"{key}.codec.faiss", lambda fh: fh.write(faiss.serialize_index(codec).tobytes()))
    return {"shape": [n, k, d], "bytes_per_vector": int(codec.sa_code_size()), "vectors": int(offsets[-1])}


def map_rows(path: Path) -> np.ndarray:
    """The ``.npy`` array at ``path``, memory-mapped read-only for reads of scattered rows
    (``madvise(MADV_RANDOM)``): a page fault then reads its page, not the 128 KB read-around the
    kernel does by default. A shortlist touches a few rows per key; with read-around, 195 text
    queries on a 1M-image sq4 gallery left 4.6 GB of the store's pages resident in the server
    (BENCHMARKS "A million images")."""
    array = np.load(path, mmap_mode="r")
    mapped = getattr(array, "_mmap", None)  # numpy's mmap.mmap of the file
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return array


class LazyRows:
    """An array-like of ``shape`` whose rows are produced on indexing: ``a[rows]`` or
    ``a[rows, ...]`` (the rest of the index applies to the rows produced)."""

    shape: tuple

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        rows = row_index(first, self.shape[0])
        out = self._take(np.atleast_1d(rows))
        out = out[0] if np.ndim(rows) == 0 else out
        return out[(slice(None), *rest)] if rest and np.ndim(rows) else out[rest] if rest else out

    def _take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (an int array) as a new array."""
        raise NotImplementedError


class CodedBlocks(LazyRows):
    """A key's blocks as FAISS codes: indexing decodes the rows asked for into ``(n, K, d)``
    float32 unit vectors, zero past each item's real blocks (as the image encoder pads)."""

    def __init__(self, directory: Path, key: str, shape: list[int]):
        try:
            import faiss
        except ImportError:
            raise StoreError(f"{directory / key}: a coded gallery store needs faiss (pip install 'fbnet[search]')") \
                from None
        self.key, self.shape, self.dtype = key, tuple(shape), np.dtype(np.float32)
        paths = {p: directory / f"{key}.{p}" for p in ("codes.npy", "offsets.npy", "codec.faiss")}
        for p in paths.values():
            if not p.is_file():
                raise StoreError(f"{p}: missing from the coded gallery; re-run `fbnet-serve-cli index`")
        try:
            self.codes = map_rows(paths["codes.npy"])
            self.offsets = np.load(paths["offsets.npy"])
        except (ValueError, OSError) as exc:
            raise StoreError(f"{directory / key}.*.npy: unreadable ({exc})") from None
        try:
            self.codec = faiss.deserialize_index(np.fromfile(paths["codec.faiss"], dtype=np.uint8))
        except Exception as exc:  # FAISS raises RuntimeError with its C++ message
            raise StoreError(f"{paths['codec.faiss']}: corrupt codebook ({str(exc).splitlines()[0][:200]})") from None
        if len(self.offsets) != self.shape[0] + 1 or self.offsets[-1] != len(self.codes) \
                or self.codes.shape[1] != self.codec.sa_code_size():
            raise StoreError(f"{paths['codes.npy']}: {len(self.codes):,} codes of {self.codes.shape[1]} bytes do not "
                             f"match {paths['offsets.npy'].name} and the codec (truncated or mixed files)")

    def _take(self, rows: np.ndarray) -> np.ndarray:
        starts = self.offsets[rows]
        lens = self.offsets[rows + 1] - starts
        out = np.zeros((len(rows), *self.shape[1:]), np.float32)
        if lens.sum():
            take = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
            vectors = self.codec.sa_decode(np.ascontiguousarray(self.codes[take]))
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            slot = np.arange(self.shape[1])[None, :] < lens[:, None]
            out[slot] = vectors
        return out
