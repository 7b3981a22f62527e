"""Converters from public datasets' own files to the fbnet layout (``fbnet data convert``).

Images are referenced where they are (absolute paths), never copied. Formats without official
splits get a seeded split (80/10/10, per category where there are categories).

* ``pascal-sentence``: ``SOURCE/dataset/<category>/<image>.jpg`` and
  ``SOURCE/sentence/<category>/<image>.txt`` (one sentence a line); label = category.
* ``wikipedia`` (Rasiwasia et al.): ``SOURCE/trainset_txt_img_cat.list`` and
  ``testset_txt_img_cat.list`` (``text_id<TAB>image_id<TAB>category``, 1-based),
  ``SOURCE/texts/<text_id>.xml`` (the document in a ``<text>`` element), images under
  ``SOURCE/images/<category_name>/<image_id>.jpg``, ``SOURCE/categories.list``; 10% of train is val.
* ``nus-wide``: ``SOURCE/ImageList/TrainImagelist.txt`` and ``TestImagelist.txt`` (image paths
  with ``\\`` separators), ``SOURCE/NUS_WID_Tags/TrainTags1k.dat`` / ``TestTags1k.dat`` are not
  needed: tags come from ``SOURCE/NUS_WID_Tags/All_Tags.txt`` (``id tag tag ...``, in the order of
  ``ImageList/Imagelist.txt``), the caption is the tag list; optional ``SOURCE/labels.txt``
  (one class name per image, same order) gives categories; ``--images`` is the image root.
* ``flickr``: Flickr8k/30k token file (``image#n<TAB>caption``), split lists beside it named
  ``*train*``, ``*dev*``/``*val*``, ``*test*`` (``.txt``); ``--images`` is the image directory.
* ``karpathy``: Karpathy's ``dataset_*.json`` (``images[].filename/split/sentences[].raw``,
  ``restval`` counts as train); ``--images`` is the image root (``filepath`` is honoured).
* ``coco``: a COCO captions JSON (``images``, ``annotations[].caption``); its split is taken from
  the file name (``train``/``val``); 5,000 images of a val file become test.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .manifest import Dataset, DatasetError, Item, write_dataset


def _split_ids(n: int, seed: int, fractions=(0.8, 0.1)) -> list[str]:
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = round(n * fractions[0]), round(n * fractions[1])
    split = np.empty(n, dtype=object)
    split[order[:n_train]] = "train"
    split[order[n_train:n_train + n_val]] = "val"
    split[order[n_train + n_val:]] = "test"
    return list(split)


def _finish(out, name, items, classes=None) -> Dataset:
    if not items:
        raise DatasetError(f"{name}: no items found; check the source layout (see fbnet/data/convert.py)")
    write_dataset(out, name, items, classes)
    from .manifest import load_dataset

    return load_dataset(out)


def pascal_sentence(source: Path, out: Path, images=None, seed=0) -> Dataset:
    img_root, txt_root = Path(source) / "dataset", Path(source) / "sentence"
    classes = sorted(p.name for p in img_root.iterdir() if p.is_dir()) if img_root.is_dir() else []
    items = []
    for label, cls in enumerate(classes):
        files = sorted((img_root / cls).glob("*.jpg"))
        for f, split in zip(files, _split_ids(len(files), seed + label)):
            txt = txt_root / cls / (f.stem + ".txt")
            if not txt.is_file():
                raise DatasetError(f"{txt}: sentences for {f} not found")
            caps = [ln.strip() for ln in txt.read_text(errors="replace").splitlines() if ln.strip()]
            items.append(Item(f"{cls}/{f.stem}", f.resolve(), split, caps, label))
    return _finish(out, "pascal-sentence", items, classes)


def wikipedia(source: Path, out: Path, images=None, seed=0) -> Dataset:
    source = Path(source)
    cats_file = source / "categories.list"
    if not cats_file.is_file():
        raise DatasetError(f"{cats_file}: not found")
    classes = [ln.strip() for ln in cats_file.read_text().splitlines() if ln.strip()]
    items = []
    for list_name, base_split in (("trainset_txt_img_cat.list", "train"), ("testset_txt_img_cat.list", "test")):
        path = source / list_name
        if not path.is_file():
            raise DatasetError(f"{path}: not found")
        rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
        splits = _split_ids(len(rows), seed, (0.9, 0.1)) if base_split == "train" else ["test"] * len(rows)
        splits = ["val" if s == "val" else base_split for s in splits]
        for lineno, (row, split) in enumerate(zip(rows, splits), 1):
            if len(row) != 3 or not row[2].isdigit() or not 1 <= int(row[2]) <= len(classes):
                raise DatasetError(f"{path} line {lineno}: expected 'text_id image_id category(1-{len(classes)})'")
            text_id, image_id, cat = row[0], row[1], int(row[2]) - 1
            xml = source / "texts" / f"{text_id}.xml"
            try:
                text = ET.parse(xml).getroot().findtext(".//text") or ""
            except (OSError, ET.ParseError) as exc:
                raise DatasetError(f"{xml}: cannot read text ({exc})") from None
            image = source / "images" / classes[cat] / f"{image_id}.jpg"
            items.append(Item(text_id, image.resolve(), split, [" ".join(text.split())], cat))
    return _finish(out, "wikipedia", items, classes)


def nus_wide(source: Path, out: Path, images=None, seed=0) -> Dataset:
    source = Path(source)
    img_root = Path(images) if images else source / "images"
    listing = source / "ImageList" / "Imagelist.txt"
    tags = source / "NUS_WID_Tags" / "All_Tags.txt"
    for p in (listing, tags):
        if not p.is_file():
            raise DatasetError(f"{p}: not found")
    paths = [ln.strip().replace("\\", "/") for ln in listing.read_text().splitlines() if ln.strip()]
    tag_rows = [ln.split() for ln in tags.read_text(errors="replace").splitlines() if ln.strip()]
    if len(tag_rows) != len(paths):
        raise DatasetError(f"{tags}: {len(tag_rows)} lines but {listing} lists {len(paths)} images")
    test_list = source / "ImageList" / "TestImagelist.txt"
    test = ({ln.strip().replace("\\", "/") for ln in test_list.read_text().splitlines()}
            if test_list.is_file() else set())
    labels_file = source / "labels.txt"
    names = [ln.strip() for ln in labels_file.read_text().splitlines()] if labels_file.is_file() else None
    classes = sorted(set(names)) if names else None
    seeded = _split_ids(len(paths), seed)
    items = []
    for i, (p, row) in enumerate(zip(paths, tag_rows)):
        split = "test" if p in test else ("val" if test and seeded[i] == "val" else
                                          "train" if test else seeded[i])
        label = classes.index(names[i]) if names else None
        items.append(Item(row[0], (img_root / p).resolve(), split, [" ".join(row[1:])], label))
    return _finish(out, "nus-wide", items, classes)


def flickr(source: Path, out: Path, images=None, seed=0) -> Dataset:
    token_file = Path(source)
    if images is None:
        raise DatasetError("flickr: give --images, the directory that holds the JPEGs")
    captions: dict[str, list[str]] = {}
    for lineno, line in enumerate(token_file.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        key, _, cap = line.partition("\t")
        if not cap or "#" not in key:
            raise DatasetError(f"{token_file} line {lineno}: expected '<image>#<n><TAB><caption>'")
        captions.setdefault(key.rsplit("#", 1)[0], []).append(cap.strip())
    splits = {}
    for lst in sorted(token_file.parent.glob("*.txt")):
        low = lst.name.lower()
        split = ("train" if "train" in low else "val" if ("dev" in low or "val" in low)
                 else "test" if "test" in low else None)
        if split and lst != token_file:
            for ln in lst.read_text().split():
                splits[ln.strip()] = split
    if not splits:
        raise DatasetError(f"{token_file.parent}: no split lists (*train*.txt, *dev*.txt, *test*.txt)")
    items = [Item(name, (Path(images) / name).resolve(), splits[name], caps)
             for name, caps in captions.items() if name in splits]
    return _finish(out, token_file.parent.name or "flickr", items)


def karpathy(source: Path, out: Path, images=None, seed=0) -> Dataset:
    data = json.loads(Path(source).read_text())
    root = Path(images) if images else Path(source).parent
    items = []
    for i, im in enumerate(data.get("images", [])):
        split = {"restval": "train"}.get(im["split"], im["split"])
        rel = Path(im.get("filepath", "")) / im["filename"]
        items.append(Item(str(im.get("imgid", i)), (root / rel).resolve(), split,
                          [s["raw"] for s in im["sentences"]]))
    return _finish(out, Path(source).stem, items)


def coco(source: Path, out: Path, images=None, seed=0) -> Dataset:
    source = Path(source)
    data = json.loads(source.read_text())
    root = Path(images) if images else source.parent
    base = "train" if "train" in source.name else "val"
    caps: dict[int, list[str]] = {}
    for ann in data.get("annotations", []):
        caps.setdefault(ann["image_id"], []).append(ann["caption"])
    items = []
    for n, im in enumerate(sorted(data.get("images", []), key=lambda d: d["id"])):
        split = base if base == "train" else ("test" if n < 5000 else "val")
        items.append(Item(str(im["id"]), (root / im["file_name"]).resolve(), split, caps.get(im["id"], [])))
    return _finish(out, re.sub(r"\W+", "-", source.stem), items)


CONVERTERS = {"pascal-sentence": pascal_sentence, "wikipedia": wikipedia, "nus-wide": nus_wide,
              "flickr": flickr, "karpathy": karpathy, "coco": coco}
