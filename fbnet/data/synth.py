"""The embedded default dataset: synthetic scenes with captions, labels and boxes.

Each image is a textured background (sky, grass, water, sand, snow, brick, night) with 1-3
foreground objects (10 shape classes, 8 colours, 2 sizes). Five captions per image come from
several templates and synonyms and name the objects with their attributes and the background.
The category label is the main (first-named, largest) object's class; object boxes are written
both in the manifest and as COCO JSON (``boxes.coco.json``) for detector training.
Everything is deterministic from ``seed``: item ``i`` draws from ``default_rng([seed, i])``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_dir, atomic_write_text
from .manifest import Item, write_dataset

SYNTH_VERSION = 1

SHAPES = {
    "circle": ["circle", "disc", "round shape", "dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge", "pyramid shape"],
    "star": ["star", "starburst"],
    "cross": ["cross", "plus sign"],
    "ring": ["ring", "hoop", "donut"],
    "diamond": ["diamond", "rhombus"],
    "hexagon": ["hexagon", "six sided shape"],
    "crescent": ["crescent", "moon shape"],
    "arrow": ["arrow", "pointer"],
}
COLOURS = {
    "red": ((215, 35, 35), ["red", "crimson"]),
    "green": ((30, 150, 50), ["green", "emerald"]),
    "blue": ((40, 70, 210), ["blue", "navy"]),
    "yellow": ((240, 210, 30), ["yellow", "golden"]),
    "purple": ((130, 50, 170), ["purple", "violet"]),
    "orange": ((245, 130, 20), ["orange", "amber"]),
    "black": ((20, 20, 20), ["black", "dark"]),
    "white": ((245, 245, 245), ["white", "pale"]),
}
SIZES = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
BACKGROUNDS = {
    "sky": ["the sky", "a blue sky", "a cloudy sky"],
    "grass": ["grass", "a lawn", "a green field", "the meadow"],
    "water": ["water", "the sea", "a lake", "waves"],
    "sand": ["sand", "the beach", "a sandy desert"],
    "snow": ["snow", "a snowy field", "white snow"],
    "brick": ["a brick wall", "bricks", "a red brick wall"],
    "night": ["the night sky", "a dark night", "a starry night"],
}
PREPOSITIONS = ["on", "over", "in front of", "against"]
CLASSES = list(SHAPES)


def generate(out: str | Path, seed: int = 0, sizes=(800, 200, 200), image_size: int = 128) -> Path:
    """Write the synthetic dataset to ``out`` (atomically) and return its path."""
    out = Path(out)
    n_total = sum(sizes)
    splits = ["train"] * sizes[0] + ["val"] * sizes[1] + ["test"] * sizes[2]
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        items, coco_images, coco_anns = [], [], []
        for i in range(n_total):
            rng = np.random.default_rng([seed, i])
            image, objects, background = draw_scene(rng, image_size)
            name = f"images/{i:05d}.png"
            image.save(tmp / name)
            captions = [caption(rng, objects, background) for _ in range(5)]
            boxes = [[*o["box"], CLASSES.index(o["shape"])] for o in objects]
            items.append(Item(f"synth-{i:05d}", tmp / name, splits[i], captions,
                              CLASSES.index(objects[0]["shape"]), boxes))
            coco_images.append({"id": i, "file_name": name, "width": image_size, "height": image_size})
            for b in boxes:
                x1, y1, x2, y2, c = b
                coco_anns.append({"id": len(coco_anns), "image_id": i, "category_id": c,
                                  "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                  "iscrowd": 0})
        write_dataset(tmp, f"synth-seed{seed}", items, CLASSES, CLASSES)
        coco = {"images": coco_images, "annotations": coco_anns,
                "categories": [{"id": i, "name": c} for i, c in enumerate(CLASSES)]}
        atomic_write_text(tmp / "boxes.coco.json", json.dumps(coco))
        atomic_write_text(tmp / "SYNTH_VERSION", f"{SYNTH_VERSION} seed={seed} sizes={list(sizes)}\n")
    return out


def draw_scene(rng: np.random.Generator, size: int):
    background = str(rng.choice(list(BACKGROUNDS)))
    canvas = Image.fromarray(paint_background(rng, background, size))
    draw = ImageDraw.Draw(canvas)
    n_obj = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    objects, placed = [], []
    for k in range(n_obj):
        size_name = "large" if k == 0 or rng.random() < 0.3 else "small"
        radius = int(rng.integers(22, 30) if size_name == "large" else rng.integers(10, 15)) * size // 128
        for _ in range(30):  # rejection-sample a spot that does not overlap much
            cx, cy = (int(v) for v in rng.integers(radius + 2, size - radius - 2, size=2))
            if all(abs(cx - px) + abs(cy - py) > (radius + pr) * 1.1 for px, py, pr in placed):
                break
        placed.append((cx, cy, radius))
        shape = str(rng.choice(CLASSES))
        colour = str(rng.choice(list(COLOURS)))
        _draw_shape(draw, shape, cx, cy, radius, COLOURS[colour][0], background)
        box = [max(cx - radius, 0), max(cy - radius, 0), min(cx + radius, size), min(cy + radius, size)]
        objects.append({"shape": shape, "colour": colour, "size": size_name, "box": box})
    return canvas, objects, background


def paint_background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    if kind == "sky":
        base = np.stack([110 + 80 * yy, 170 + 60 * yy, 235 + 0 * yy], -1)
        for _ in range(int(rng.integers(2, 5))):
            cx, cy, r = rng.random(), rng.random() * 0.6, 0.08 + 0.1 * rng.random()
            cloud = np.exp(-(((xx - cx) / (1.8 * r)) ** 2 + ((yy - cy) / r) ** 2))
            base = base + cloud[..., None] * (250 - base) * 0.9
        base = base + noise[..., None] * 3
    elif kind == "grass":
        base = np.stack([50 + 10 * noise, 140 + 25 * noise, 40 + 8 * noise], -1)
        blades = (np.sin(xx * 90 + 6 * noise) > 0.6)[..., None] * np.array([-15, 30, -10])
        base = base + blades
    elif kind == "water":
        waves = np.sin(yy * 60 + 4 * np.sin(xx * 12 + rng.random() * 6))
        base = np.stack([30 + 15 * waves, 90 + 25 * waves, 170 + 30 * waves], -1) + noise[..., None] * 4
    elif kind == "sand":
        ripple = np.sin((xx + 0.3 * yy) * 40 + rng.random() * 6)
        base = np.stack([220 + 8 * ripple, 195 + 8 * ripple, 140 + 6 * ripple], -1) + noise[..., None] * 10
    elif kind == "snow":
        speck = (noise > 2.0)[..., None] * np.array([-40, -30, -10])
        base = np.stack([238 - 10 * yy, 242 - 8 * yy, 250 + 0 * yy], -1) + speck + noise[..., None] * 2
    elif kind == "brick":
        rows = (yy * size / 12).astype(int)
        offset = (rows % 2) * 0.5
        cols = ((xx * size / 24) + offset) % 1.0
        mortar = ((yy * size) % 12 < 2) | (cols < 0.08)
        base = np.where(mortar[..., None], np.array([200, 195, 185]), np.array([165, 60, 40]))
        base = base + noise[..., None] * 8
    elif kind == "night":
        stars = (noise > 2.6)[..., None] * np.array([200, 200, 170])
        base = np.stack([10 + 10 * yy, 15 + 15 * yy, 50 + 30 * yy], -1) + stars
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(base, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape, cx, cy, r, colour, background):
    outline = (90, 90, 90) if colour == (245, 245, 245) and background == "snow" else None
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=outline)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(3, r // 3))
    elif shape == "square":
        s = int(r * 0.85)
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour, outline=outline)
    elif shape == "cross":
        t = max(2, r // 3)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    elif shape == "crescent":
        canvas = draw._image  # the canvas this draw paints on
        mask = Image.new("L", canvas.size, 0)
        mdraw = ImageDraw.Draw(mask)
        mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = int(r * 0.55)
        mdraw.ellipse([cx - r + off, cy - r - 2, cx + r + off, cy + r - 2], fill=0)
        canvas.paste(colour, mask=mask)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=colour, outline=outline)


def _polygon(shape, cx, cy, r):
    def ring(n, radius, phase=-np.pi / 2):
        a = phase + np.arange(n) * 2 * np.pi / n
        return list(zip(cx + radius * np.cos(a), cy + radius * np.sin(a)))

    if shape == "triangle":
        return ring(3, r)
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.65, cy), (cx, cy + r), (cx - r * 0.65, cy)]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r), ring(5, r * 0.42, -np.pi / 2 + np.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "arrow":
        t = r * 0.3
        return [(cx - r, cy - t), (cx, cy - t), (cx, cy - r), (cx + r, cy), (cx, cy + r), (cx, cy + t),
                (cx - r, cy + t)]
    raise ValueError(f"unknown shape {shape!r}")


def caption(rng: np.random.Generator, objects: list[dict], background: str) -> str:
    """One caption naming every object (with attributes) and the background."""
    pick = lambda options: str(rng.choice(options))  # noqa: E731

    def phrase(o, with_size=None):
        with_size = rng.random() < 0.6 if with_size is None else with_size
        words = ([pick(SIZES[o["size"]])] if with_size else []) + [pick(COLOURS[o["colour"]][1]),
                                                                  pick(SHAPES[o["shape"]])]
        return " ".join(words)

    main, rest = objects[0], objects[1:]
    bg = pick(BACKGROUNDS[background])
    others = "".join(f" and a {phrase(o)}" for o in rest)
    templates = [
        lambda: f"a {phrase(main, True)}{others} {pick(PREPOSITIONS)} {bg}",
        lambda: f"{bg} with a {phrase(main)}{others}",
        lambda: f"there is a {phrase(main)} {pick(PREPOSITIONS)} {bg}{others}",
        lambda: f"an image of a {pick(SHAPES[main['shape']])} that is {pick(COLOURS[main['colour']][1])}"
                f"{others} with {bg} behind it",
        lambda: f"{phrase(main)}{others} seen {pick(PREPOSITIONS)} {bg}",
        lambda: f"a picture showing a {phrase(main)} in the middle of {bg}{others}",
    ]
    return templates[int(rng.integers(len(templates)))]()
