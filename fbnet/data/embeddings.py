"""Pretrained word vectors (word2vec binary or GloVe text) for the 300-d embedding layer (torch-free)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ..errors import FbnetError


class WordVectorError(FbnetError, ValueError):
    """A word-vector file is missing or malformed; the message names the file and line."""


def load_word_vectors(path: str | Path, wanted: set[str] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Read vectors for ``wanted`` words (all when None). Returns (vectors, dim).

    word2vec binary: header ``"<count> <dim>"``, then per word ``word<space><dim float32>``
    (an optional newline). GloVe text: ``word v1 ... vdim`` per line. The format is sniffed.
    """
    path = Path(path)
    if not path.is_file():
        raise WordVectorError(f"{path}: word-vector file not found")
    with path.open("rb") as fh:
        head = fh.readline()
        parts = head.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return _word2vec_binary(fh, path, int(parts[0]), int(parts[1]), wanted)
    return _glove_text(path, wanted)


def _word2vec_binary(fh, path, count, dim, wanted):
    out, width = {}, 4 * dim
    for n in range(count):
        word = bytearray()
        while (ch := fh.read(1)) != b" ":
            if not ch:
                raise WordVectorError(f"{path}: truncated after {n} of {count} words")
            if ch != b"\n":
                word += ch
        vec = fh.read(width)
        if len(vec) != width:
            raise WordVectorError(f"{path}: truncated vector for word {n + 1}")
        w = word.decode("utf-8", errors="replace").lower()
        if wanted is None or w in wanted:
            out.setdefault(w, np.frombuffer(vec, dtype="<f4").copy())
    return out, dim


def _glove_text(path, wanted):
    out, dim = {}, None
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip().split(" ")
            if len(parts) < 2:
                continue
            dim = dim or len(parts) - 1
            if len(parts) - 1 != dim:
                raise WordVectorError(f"{path} line {lineno}: {len(parts) - 1} values, expected {dim}")
            w = parts[0].lower()
            if wanted is None or w in wanted:
                try:
                    out.setdefault(w, np.asarray(parts[1:], dtype=np.float32))
                except ValueError:
                    raise WordVectorError(f"{path} line {lineno}: non-numeric value") from None
    if dim is None:
        raise WordVectorError(f"{path}: no vectors found (expected word2vec binary or GloVe text)")
    return out, dim
