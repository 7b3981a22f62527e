"""Caption tokenisation and the vocabulary saved with every checkpoint and bundle (torch-free)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens; punctuation is dropped."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Word <-> id map; id 0 is padding, id 1 is the unknown word."""

    def __init__(self, words: Iterable[str]):
        self.words = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocabulary":
        counts = Counter(t for c in captions for t in tokenize(c))
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def encode(self, text: str, max_words: int) -> list[int]:
        """Token ids of ``text`` (at most ``max_words``); unknown words map to ``<unk>``."""
        return [self.index.get(t, 1) for t in tokenize(text)[:max_words]]

    def encode_batch(self, texts: list[str], max_words: int) -> tuple[np.ndarray, np.ndarray]:
        """Padded ``(n, L)`` int64 ids and ``(n,)`` lengths; every caption needs a known length >= 1."""
        ids = [self.encode(t, max_words) for t in texts]
        for text, row in zip(texts, ids):
            if not row:
                raise ValueError(f"caption has no words: {text!r}")
        width = max(len(r) for r in ids)
        out = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(ids):
            out[i, : len(row)] = row
        return out, np.array([len(r) for r in ids], dtype=np.int64)

    def to_json(self) -> dict:
        return {"words": self.words}

    @classmethod
    def from_json(cls, data: dict) -> "Vocabulary":
        return cls(data["words"][2:])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_json(json.loads(Path(path).read_text()))
