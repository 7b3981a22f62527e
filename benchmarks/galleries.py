"""Synthetic galleries with a bundle's shapes, for the benchmarks (no images need encoding)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from fbnet.runtime.engine.features import ImageFeatures, TextFeatures
from fbnet.runtime.engine.manifest import GalleryMeta
from fbnet.runtime.gallery.build import code_features, gallery_meta
from fbnet.runtime.gallery.first_stage import recorded_first_stage_key
from fbnet.runtime.gallery.gallery import Gallery


def key_shapes(bundle) -> dict[str, tuple[int, int]]:
    """(blocks K, windows M) per key, e.g. F3 -> (J * 9, 9), G1 (the pooled global branch) -> (1, 1);
    a word key has ``max_words`` units."""
    j, words = bundle.model.max_boxes, set(bundle.model.word_keys)
    return {k: ((j if k[0] == "F" else 1) * int(k[1]) ** 2, bundle.model.max_words if k in words else int(k[1]) ** 2)
            for k in bundle.keys}


#: Mean words per Flickr8k caption (the recipe's vocabulary: 11.8); synthetic word keys draw
#: caption lengths around it and zero the rest, as the text encoder pads.
FLICKR8K_WORDS = (6, 18)


def text_units(rng, bundle, key: str, n: int, m: int, d: int) -> np.ndarray:
    """Unit window features, or for a word key unit word features zero past a drawn length."""
    x = unit(rng, n, m, d)
    if key in bundle.model.word_keys:
        lengths = rng.integers(*FLICKR8K_WORDS, size=n, endpoint=True)
        x *= (np.arange(m)[None, :] < lengths[:, None])[:, :, None]
    return x


def unit(rng, *shape) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


#: Share of Flickr8k training images with 1 .. 9 YOLOv3-tiny boxes (the recipe's feature cache,
#: ``benchmarks/training.py``'s ``box_count_probs``): 3.6 boxes on average.
FLICKR8K_BOX_SHARES = (0.326, 0.178, 0.113, 0.082, 0.059, 0.043, 0.030, 0.027, 0.142)


def box_mask(rng, n: int, j: int) -> np.ndarray:
    """Real boxes first, box counts drawn as on Flickr8k (J = 9), else uniform over 1 .. J."""
    shares = np.array(FLICKR8K_BOX_SHARES) if j == len(FLICKR8K_BOX_SHARES) else np.ones(j)
    counts = rng.choice(np.arange(1, j + 1), size=n, p=shares / shares.sum())
    return (np.arange(j)[None, :] < counts[:, None]).astype(np.float32)


def synthetic(bundle, n_img: int, n_cap: int, seed: int = 0) -> tuple[ImageFeatures, TextFeatures]:
    rng, d, shapes = np.random.default_rng(seed), bundle.model.embed_dim, key_shapes(bundle)
    mask = box_mask(rng, n_img, bundle.model.max_boxes)
    blocks = {}
    for k, (kk, _) in shapes.items():
        b = unit(rng, n_img, kk, d)
        if k[0] == "F":  # zero the blocks of absent boxes, as the image encoder does
            b *= np.repeat(mask, kk // bundle.model.max_boxes, axis=1)[:, :, None]
        blocks[k] = b
    return ImageFeatures(blocks, mask), TextFeatures({k: text_units(rng, bundle, k, n_cap, m, d) for k, (_, m) in shapes.items()})



def synthetic_gallery(bundle, n: int, root: Path, random_rows: int = 10_000, dtype="float32",
                      image_files: list[Path] | None = None) -> Gallery:
    """A gallery of ``n`` images and ``n`` captions with the bundle's shapes: random unit block and
    window features for the first ``random_rows`` items; past them only the first-stage vectors are
    random and the other blocks are zeros of a sparse file, which changes no arithmetic the scorer
    does. Image paths are ``image_files`` repeated (real files, for a server's page), or made up."""
    out = root / f"synthetic-{n}"
    paths = [str(image_files[i % len(image_files)]) for i in range(n)] if image_files else \
        [f"synthetic/{i:06d}.jpg" for i in range(n)]
    meta = replace(gallery_meta(bundle, paths, [f"synthetic caption {i}" for i in range(n)], dtype), n_images=n,
                   n_captions=n, extra={"box_counts": "flickr8k", "absent_boxes": "zero"}).to_dict()
    if (out / "gallery.json").is_file() and json.loads((out / "gallery.json").read_text()) == meta:
        return Gallery(out, bundle)
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    (out / "texts").mkdir()
    rng, d, shapes = np.random.default_rng(1), bundle.model.embed_dim, key_shapes(bundle)
    j = bundle.model.max_boxes
    mask = box_mask(rng, n, j)
    np.save(out / "images" / "fg_mask.npy", mask)
    for side, which in (("images", 0), ("texts", 1)):
        for k, s in shapes.items():
            arr = np.lib.format.open_memmap(out / side / f"{k}.npy", mode="w+", dtype=dtype, shape=(n, s[which], d))
            for start in range(0, min(n, random_rows), 1000):
                stop = min(start + 1000, n, random_rows)
                if side == "texts":
                    arr[start:stop] = text_units(rng, bundle, k, stop - start, s[which], d)
                    continue
                arr[start:stop] = unit(rng, stop - start, s[which], d)
                if k[0] == "F":  # zero the blocks of absent boxes, as the image encoder does
                    arr[start:stop] *= np.repeat(mask[start:stop], s[which] // j, axis=1)[:, :, None]
            if k in ("B1", "F1"):  # first-stage vectors are random for every row
                for start in range(random_rows, n, 10_000):
                    arr[start: start + 10_000] = unit(rng, min(10_000, n - start), s[which], d)
            arr.flush()
            del arr
    (out / "gallery.json").write_text(json.dumps(meta))
    os.sync()  # a new gallery's gigabytes are written back now, not while the next timings run
    return Gallery(out, bundle)


def store_copy(source: Path, root: Path, keys: list[str], store: str) -> Path:
    """``root``: the float32 gallery ``source`` in ``store`` (float16, or coded as ``index --store``
    codes it), made aside and renamed when complete; kept when a finished one is there."""
    if (root / GalleryMeta.FILE).is_file():
        return root
    work = root.with_name(root.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    meta = GalleryMeta.load(work / GalleryMeta.FILE)
    if store == "float16":
        for f in list((work / "images").glob("*.npy")) + list((work / "texts").glob("*.npy")):
            if f.name != "fg_mask.npy":
                np.save(f, np.load(f).astype(np.float16))
        meta.dtype = "float16"
    else:
        meta.coded = code_features(work, keys, store, stage_key=recorded_first_stage_key(meta))
    meta.store = store
    meta.save(work / GalleryMeta.FILE)
    os.sync()  # as for synthetic_gallery: written back before anything is timed
    return work.rename(root)

