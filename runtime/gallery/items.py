"""A gallery's item names (image paths, captions) as line files read on demand.

A gallery of millions cannot afford one JSON document of every path and caption loaded at start.
Each side is ``items/<side>.jsonl`` (one JSON string per line, so any character is safe) and
``items/<side>.offsets.npy`` (``N + 1`` byte offsets): item ``i`` is one seek and one line,
whatever ``N``; nothing is read at open but the offsets (8 bytes an item, memory-mapped).
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

from fbnet.atomic import atomic_write
from fbnet.errors import FbnetError


class ItemsError(FbnetError, ValueError):
    """An item file is missing, truncated or does not match its offsets; the message names it."""

    http_status = 500  # the server's own files


def write_items(directory: Path, side: str, values) -> int:
    """Write ``values`` as ``directory/<side>.jsonl`` + offsets (atomically); return the count."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [(json.dumps(str(v), ensure_ascii=False) + "\n").encode() for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(line) for line in lines], dtype=np.int64)]).astype(np.int64)
    atomic_write(directory / f"{side}.jsonl", lambda fh: fh.writelines(lines))
    atomic_write(directory / f"{side}.offsets.npy", lambda fh: np.save(fh, offsets))
    return len(lines)


def list_index(i: int, n: int) -> int:
    """``i`` as an index into a list of ``n`` (negative counts from the end); IndexError past it."""
    if not -n <= i < n:
        raise IndexError(i)
    return i % n


class ItemList:
    """The items of one side, indexed like a list (``len``, ``[i]``, iteration) and read lazily."""

    def __init__(self, directory: Path, side: str, count: int):
        self.path, offsets_path = directory / f"{side}.jsonl", directory / f"{side}.offsets.npy"
        for p in (self.path, offsets_path):
            if not p.is_file():
                raise ItemsError(f"{p}: missing from the gallery; re-run `fbnet-serve-cli index`")
        try:
            self.offsets = np.load(offsets_path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise ItemsError(f"{offsets_path}: unreadable ({exc})") from None
        size = self.path.stat().st_size
        if len(self.offsets) != count + 1 or int(self.offsets[-1]) != size:
            raise ItemsError(f"{self.path}: {size:,} bytes and {len(self.offsets) - 1:,} offsets do not match the "
                             f"gallery's {count:,} items (truncated or mixed files)")
        self._map = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        i = list_index(i, len(self))
        if self._map is None:
            with self.path.open("rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if len(self) else b""
        line = self._map[int(self.offsets[i]): int(self.offsets[i + 1])]
        try:
            return json.loads(line)
        except ValueError:
            raise ItemsError(f"{self.path} line {i + 1}: not a JSON string (corrupt file)") from None

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
