"""The one on-disk dataset layout every loader and converter produces.

::

    DIR/
      dataset.json     {"format": "fbnet-dataset", "version": 1, "name": ..., "classes": [...] | null,
                        "box_classes": [...] | null}
      manifest.jsonl   one item per line:
                       {"id": "...", "image": "images/x.jpg", "split": "train" | "val" | "test",
                        "captions": ["...", ...], "label": 3 | null,
                        "boxes": [[x1, y1, x2, y2, class_id], ...]}      (boxes optional)

``image`` is relative to ``DIR`` or absolute; ``label`` indexes ``classes`` (category MAP needs
labels; without them positives are an image's own captions). ``boxes`` are in the original
image's pixels. Bad lines raise :class:`DatasetError` naming the file and line; an empty or
one-word caption, or an item whose image is missing, is skipped with a warning naming both.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import FbnetError
from ..jsonfile import read_json
from ..vocab import tokenize

SPLITS = ("train", "val", "test")
FORMAT = "fbnet-dataset"


class DatasetError(FbnetError, ValueError):
    """A dataset file is missing or malformed; the message names the file and line."""


@dataclass
class Item:
    id: str
    image: Path
    split: str
    captions: list[str]
    label: int | None = None
    boxes: list[list[float]] = field(default_factory=list)

    def to_json(self, root: Path) -> dict:
        image = self.image
        try:
            image = image.relative_to(root)
        except ValueError:
            pass
        out = {"id": self.id, "image": str(image), "split": self.split, "captions": self.captions,
               "label": self.label}
        if self.boxes:
            out["boxes"] = self.boxes
        return out


@dataclass
class Dataset:
    root: Path
    name: str
    items: list[Item]
    classes: list[str] | None = None
    box_classes: list[str] | None = None

    @property
    def has_labels(self) -> bool:
        return self.classes is not None and all(i.label is not None for i in self.items)

    @property
    def has_boxes(self) -> bool:
        return self.box_classes is not None and any(i.boxes for i in self.items)

    @property
    def splits(self) -> list[str]:
        """The splits that hold items, in train/val/test order."""
        present = {i.split for i in self.items}
        return [s for s in SPLITS if s in present]

    @property
    def report_split(self) -> str:
        """The held-out split reports use: ``test``, or ``val`` when there is no test split."""
        return "test" if "test" in self.splits else "val"

    def split(self, name: str) -> list[Item]:
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        items = [i for i in self.items if i.split == name]
        if not items:
            raise DatasetError(f"{self.root / 'manifest.jsonl'}: split {name!r} has no items")
        return items


def load_dataset(root: str | Path) -> Dataset:
    """Read and validate ``root/dataset.json`` and ``root/manifest.jsonl``."""
    root = Path(root)
    meta_path, manifest = root / "dataset.json", root / "manifest.jsonl"
    for p in (meta_path, manifest):
        if not p.is_file():
            raise DatasetError(
                f"{p}: missing; a dataset directory holds dataset.json and manifest.jsonl "
                "(make one with `fbnet data synth` or `fbnet data convert`)"
            )
    meta = read_json(meta_path, DatasetError)
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{meta_path}: 'format' must be {FORMAT!r}")
    classes = meta.get("classes")
    items: list[Item] = []
    seen: set[str] = set()
    with manifest.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            item = _parse_item(line, lineno, manifest, root, classes)
            if item is None:
                continue
            if item.id in seen:
                raise DatasetError(f"{manifest} line {lineno}: duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
    if not items:
        raise DatasetError(f"{manifest}: no usable items")
    return Dataset(root, meta.get("name", root.name), items, classes, meta.get("box_classes"))


def _parse_item(line: str, lineno: int, manifest: Path, root: Path, classes) -> Item | None:
    where = f"{manifest} line {lineno}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: invalid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    for key in ("id", "image", "split", "captions"):
        if key not in raw:
            raise DatasetError(f"{where}: missing key {key!r}")
    if raw["split"] not in SPLITS:
        raise DatasetError(f"{where}: split must be one of {', '.join(SPLITS)}, not {raw['split']!r}")
    if not isinstance(raw["captions"], list):
        raise DatasetError(f"{where}: 'captions' must be a list of strings")
    label = raw.get("label")
    if label is not None and (not isinstance(label, int) or classes is None or not 0 <= label < len(classes)):
        raise DatasetError(f"{where}: label {label!r} is not an index into dataset.json's classes")
    captions = []
    for cap in raw["captions"]:
        if not isinstance(cap, str) or len(tokenize(cap)) < 2:
            warnings.warn(f"{where}: skipping caption {cap!r}: it needs at least two words", stacklevel=3)
            continue
        captions.append(cap)
    image = Path(raw["image"])
    image = image if image.is_absolute() else root / image
    if not captions:
        warnings.warn(f"{where}: skipping item {raw['id']!r}: no usable caption", stacklevel=3)
        return None
    if not image.is_file():
        warnings.warn(f"{where}: skipping item {raw['id']!r}: image {image} not found", stacklevel=3)
        return None
    boxes = raw.get("boxes") or []
    for b in boxes:
        if not (isinstance(b, list) and len(b) == 5 and b[2] > b[0] and b[3] > b[1]):
            raise DatasetError(f"{where}: box {b!r} must be [x1, y1, x2, y2, class] with x2>x1, y2>y1")
    return Item(str(raw["id"]), image, raw["split"], captions, label, boxes)


def write_dataset(
    root: str | Path,
    name: str,
    items: list[Item],
    classes: list[str] | None = None,
    box_classes: list[str] | None = None,
) -> Path:
    """Write ``dataset.json`` and ``manifest.jsonl`` into ``root`` (each file atomically)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": 1, "name": name, "classes": classes, "box_classes": box_classes}
    atomic_write_text(root / "manifest.jsonl", "".join(json.dumps(i.to_json(root)) + "\n" for i in items))
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=1))
    return root
