"""Building a gallery (``fbnet-serve-cli index``): images and captions encoded once, in parts.

Indexing works in parts under ``GALLERY.partial/`` (each part written atomically), so an
interrupted ``index`` resumes where it stopped; the finished gallery (the layout in
:mod:`fbnet.runtime.gallery.gallery`) is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fbnet.atomic import atomic_write, atomic_write_text

from ..engine.bundle import Bundle
from ..engine.features import ImageFeatures, concat_images, real_units
from ..engine.manifest import GalleryMeta
from ..engine.retriever import QueryError, Retriever
from .first_stage import INDEX_FILE, FirstStage, choose_spec, first_stage_key, pooled_images, pooled_texts
from .gallery import ITEMS_DIR, GalleryError, load_features
from .items import write_items
from .stores import CODED, write_coded


def read_captions(path: str | Path) -> list[str]:
    """One caption per line; a blank line is an error that names the line."""
    path = Path(path)
    if not path.is_file():
        raise GalleryError(f"{path}: captions file not found")
    lines = path.read_text(errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise QueryError(f"{path} line {n}: empty caption")
    return lines


def list_images(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise GalleryError(f"{directory}: image directory not found")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in exts)


def gallery_meta(bundle: Bundle, images: list, captions: list[str], dtype: str,
                 store: str | None = None) -> GalleryMeta:
    """What an index request is (the resumable plan): the bundle's encoders, the store, the items
    listed; ``gallery.json`` records it with the items moved to line files and the counts added."""
    images = [str(p) for p in images]
    return GalleryMeta(keys=bundle.keys, dtype=dtype, store=store or dtype, items_sha256=items_digest(images, captions),
                       encoders=bundle.identity, images=images, captions=list(captions))


def items_digest(images: list, captions: list[str]) -> str:
    """sha256 of the item names (what tells a finished shard holds exactly the items asked for)."""
    return hashlib.sha256(json.dumps([[str(p) for p in images], list(captions)]).encode()).hexdigest()


def build_gallery(retriever: Retriever, images: list[Path], captions: list[str], out: str | Path,
                  part_size: int = 64, dtype: str = "float32", first_stage: str = "auto",
                  memory_budget: int | None = None, store: str | None = None) -> Path:
    """Encode ``images`` and ``captions`` into the gallery ``out`` (resumable). ``first_stage``
    (``auto``, ``flat``, ``ivf``, ``hnsw``) and ``memory_budget`` (bytes for each side's first-stage
    vectors) choose the first-stage index (:func:`fbnet.runtime.gallery.first_stage.choose_spec`); any
    but ``Flat`` is built here and saved with the gallery."""
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    meta = gallery_meta(retriever.bundle, images, captions, dtype, store)
    plan = work / "plan.json"
    request = meta.to_dict()
    if plan.is_file() and json.loads(plan.read_text()) != request:
        shutil.rmtree(work)  # a different request: start over
        work.mkdir(parents=True)
    atomic_write_text(plan, json.dumps(request))
    n_parts = (len(images) + part_size - 1) // part_size
    for p in tqdm(range(n_parts), desc="index images", unit="part"):
        target = work / f"images-{p:05d}.npz"
        if not target.is_file():
            feats = retriever.encode_images(images[p * part_size: (p + 1) * part_size])
            arrays = {**{k: v.astype(dtype) for k, v in feats.blocks.items()}, "fg_mask": feats.fg_mask}
            atomic_write(target, lambda fh: np.savez(fh, **arrays))
    text_target = work / "texts.npz"
    if not text_target.is_file():
        feats = retriever.encode_texts(captions) if captions else None
        arrays = {k: v.astype(dtype) for k, v in feats.windows.items()} if feats else {}
        atomic_write(text_target, lambda fh: np.savez(fh, **arrays))
    # consolidate into memory-mappable arrays, then publish the directory in one rename
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    (final / "images").mkdir(parents=True)
    (final / "texts").mkdir()
    parts = [np.load(work / f"images-{p:05d}.npz") for p in range(n_parts)]
    if parts:
        merged = concat_images([ImageFeatures({k: q[k] for k in retriever.keys}, q["fg_mask"]) for q in parts])
        for k, v in merged.blocks.items():
            np.save(final / "images" / f"{k}.npy", v)
        np.save(final / "images" / "fg_mask.npy", merged.fg_mask)
    with np.load(text_target) as texts:
        for k in texts.files:
            np.save(final / "texts" / f"{k}.npy", texts[k])
    stages, stage_key = {}, first_stage_key(retriever.keys)
    for side, pool in (("images", pooled_images), ("texts", pooled_texts)):
        g = load_features(final, side, retriever.keys)
        if g is None:
            continue
        vectors = pool(g, stage_key)
        spec = choose_spec(len(vectors), vectors.shape[1], memory_budget, first_stage)
        if spec != "Flat":
            FirstStage(vectors, spec=spec).save(final / side / INDEX_FILE)
        stages[side] = spec
    coded = code_features(final, retriever.keys, store, retriever.word_keys, stage_key) if store in CODED else {}
    for side in ("images", "captions"):  # item names as line files, read on demand (see fbnet.runtime.gallery.items)
        write_items(final / ITEMS_DIR, side, getattr(meta, side))
    replace(meta, images=None, captions=None, n_images=len(images), n_captions=len(captions), items=ITEMS_DIR,
            first_stage=stages, first_stage_key=stage_key, coded=coded).save(final / GalleryMeta.FILE)
    if out.exists():
        shutil.rmtree(out)
    os.replace(final, out)
    shutil.rmtree(work)
    return out


def code_features(root: Path, keys: list[str], store: str, word_keys=(), stage_key: str | None = None) -> dict:
    """Replace every key's array in the gallery directory ``root`` but the first stage's
    (``stage_key``, default :func:`first_stage_key`) by FAISS codes of its real rows; return
    gallery.json's ``coded`` record."""
    stage_key = stage_key or first_stage_key(keys)
    coded = {}
    for side in ("images", "texts"):
        feats = load_features(root, side, keys)
        if feats is None:
            continue
        coded[side] = {}
        arrays = feats.blocks if side == "images" else feats.windows
        for key in keys:
            arr, path = arrays[key], root / side / f"{key}.npy"
            if key == stage_key:  # the first stage's vectors stay plain (float16)
                np.save(root / side / "f16.npy", np.asarray(arr, dtype=np.float16))
                del arr, arrays[key]
                os.replace(root / side / "f16.npy", path)
                continue
            if side == "images" and key.startswith("F"):  # u**2 blocks a real box
                counts = np.asarray(feats.fg_mask).sum(axis=1).astype(np.int64) * (arr.shape[1] // feats.fg_mask.shape[1])
            elif side == "texts" and key in word_keys:  # words: as many as the caption has
                counts = np.concatenate([real_units(np.asarray(arr[i:i + 8192], np.float32))
                                         for i in range(0, len(arr), 8192)]).astype(np.int64)
            else:
                counts = np.full(arr.shape[0], arr.shape[1], np.int64)
            coded[side][key] = write_coded(root / side, key, arr, counts, store)
            del arr, arrays[key]
            path.unlink()
    return coded
