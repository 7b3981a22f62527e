"""Image decoding and resizing shared by training, export and the runtime (numpy + PIL, no torch).

Every image is decoded to RGB and resized (bilinear) to a square ``size x size`` canvas; pixel
values are float32 in [0, 1], channels first. Mean/std normalisation happens inside the models
(and so inside the exported graphs), so this is all a serving host has to reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FbnetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: declared pixels above which a served upload is refused before decoding (40 MP)
MAX_PIXELS = 40_000_000


class ImageError(FbnetError, ValueError):
    """An image is missing, unreadable or too small; the message names the file."""


class ImageTooLarge(ImageError):
    """An image declares more pixels than allowed (found from its header, before decoding)."""

    http_status = 413


def load_image(path: str | Path | BinaryIO, size: int, min_side: int = 8, name: str | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """Decode ``path`` (a file name, or an open binary file such as an upload) to a float32
    ``(3, size, size)`` array in [0, 1]; messages name ``name`` or the path. With ``max_pixels``,
    an image whose header declares more pixels is refused before any pixel is decoded (a
    decompression bomb costs a header read, not gigabytes)."""
    source = path if hasattr(path, "read") else Path(path)
    path = name or str(source)
    try:
        with Image.open(source) as im:
            if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                raise ImageTooLarge(f"{path}: image declares {im.size[0]}x{im.size[1]} pixels, over the "
                                    f"limit of {max_pixels:,}")
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path}: image not found") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{path}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
    if min(rgb.size) < min_side:
        raise ImageError(
            f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, smaller than the {min_side}px "
            "the window grid needs"
        )
    return to_canvas(rgb, size)


def to_canvas(image: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB PIL image to the ``size x size`` canvas as float32 CHW in [0, 1]."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
