"""A gallery's item names live in line files read on demand, not in one JSON document."""

import json
import shutil

import numpy as np
import pytest

from fbnet.runtime.gallery.gallery import Gallery, GalleryError
from fbnet.runtime.gallery.items import ItemList, ItemsError, write_items


def test_line_files_round_trip_any_text(tmp_path):
    values = ["plain", "ünïcode ✓", 'quotes " and \\ backslashes', "tab\there", ""]
    assert write_items(tmp_path, "captions", values) == len(values)
    items = ItemList(tmp_path, "captions", len(values))
    assert len(items) == 5 and list(items) == values and items[-1] == "" and items[1] == values[1]
    with pytest.raises(IndexError):
        items[5]
    offsets = np.load(tmp_path / "captions.offsets.npy")
    assert offsets[0] == 0 and offsets[-1] == (tmp_path / "captions.jsonl").stat().st_size


def test_gallery_reads_items_lazily_and_names_a_damaged_file(served, tmp_path):
    _, g, root = served
    meta = json.loads((root / "gallery.json").read_text())
    assert "images" not in meta and "captions" not in meta and meta["items"] == "items"
    assert isinstance(g.images, ItemList) and len(g.images) == meta["n_images"] == 12
    assert g.images[0].endswith(".png") or g.images[0].endswith(".jpg")
    copy = tmp_path / "g"
    shutil.copytree(root, copy)
    with (copy / "items" / "captions.jsonl").open("r+b") as fh:
        fh.truncate(fh.seek(0, 2) - 3)
    with pytest.raises(GalleryError, match=r"captions\.jsonl: .* do not match"):
        Gallery(copy, g_bundle(served))
    (copy / "items" / "captions.jsonl").unlink()
    with pytest.raises(GalleryError, match=r"captions\.jsonl: missing"):
        Gallery(copy, g_bundle(served))


def test_a_gallery_listing_items_in_its_json_still_opens(served, tmp_path):
    """Galleries indexed before the line files (and the benchmarks' synthetic ones) list the items."""
    _, g, root = served
    old = tmp_path / "old"
    shutil.copytree(root, old)
    meta = json.loads((old / "gallery.json").read_text())
    meta.pop("items")
    meta["images"], meta["captions"] = list(g.images), list(g.captions)
    (old / "gallery.json").write_text(json.dumps(meta))
    shutil.rmtree(old / "items")
    again = Gallery(old, g_bundle(served))
    assert again.images == list(g.images) and again.captions == list(g.captions)


def test_corrupt_line_is_named(tmp_path):
    write_items(tmp_path, "images", ["a.jpg", "b.jpg"])
    data = (tmp_path / "images.jsonl").read_bytes().replace(b'"b.jpg"', b'"b.jpg ')
    (tmp_path / "images.jsonl").write_bytes(data)
    with pytest.raises(ItemsError, match=r"images\.jsonl line 2"):
        ItemList(tmp_path, "images", 2)[1]


def g_bundle(served):
    return served[0].bundle
