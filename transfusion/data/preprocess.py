"""Image and caption preprocessing as in the paper: PIL decoding, RGB, resize + centre crop, no augmentation.

Bad inputs are either converted cleanly or rejected with a :class:`BadRecord` naming the reason, which
the datasets turn into a counted skip with a warning (or an error in strict mode):

* modes: L, LA, 1, P, PA, RGBA, CMYK, YCbCr, I;16 / I / F are converted to 8-bit RGB (transparency is
  flattened onto white; 16/32-bit and float images are rescaled to 0..255);
* EXIF orientation is applied;
* unreadable, truncated, too small (< ``min_size`` px on a side) or too large (> ``max_pixels``) images
  are rejected;
* captions: invalid UTF-8 bytes are replaced (U+FFFD), whitespace is collapsed, empty captions dropped,
  overlong ones cut at a word boundary.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is bad data, not a grey-bottomed picture


class BadRecord(Exception):
    """A record that cannot be used; ``str(err)`` is the reason."""


def open_image(source: str | os.PathLike | bytes | dict | Image.Image) -> Image.Image:
    """A lazily decoded PIL image from a path, bytes, an ``{"path", "bytes"}`` dict (datasets' Image) or PIL."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    try:
        if isinstance(source, (bytes, bytearray)):
            return Image.open(io.BytesIO(source))
        if source is None:
            raise BadRecord("no image (empty path and bytes)")
        if not os.path.isfile(source):
            raise BadRecord("missing file")
        return Image.open(source)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadRecord(f"unreadable image ({type(err).__name__}: {err})") from err


def check_size(image: Image.Image, min_size: int, max_pixels: int) -> None:
    w, h = image.size
    if min(w, h) < min_size:
        raise BadRecord(f"too small ({w}x{h} px, min_size={min_size})")
    if w * h > max_pixels:
        raise BadRecord(f"too large ({w}x{h} px > max_pixels={max_pixels})")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and pixels.max() <= 1.0 else 255.0 if pixels.max() <= 255 else 65535.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def preprocess_image(source, size: int, min_size: int = 8, max_pixels: int = 64_000_000) -> torch.Tensor:
    """(3, size, size) float in [-1, 1]: decode, orient, RGB, resize the shorter side and centre-crop."""
    image = open_image(source)
    check_size(image, min_size, max_pixels)
    try:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # decode huge JPEGs at a reduced scale (>= size)
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    except (OSError, ValueError, SyntaxError) as err:
        raise BadRecord(f"cannot decode image ({type(err).__name__}: {err})") from err
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def clean_caption(caption: str | bytes | None, max_chars: int) -> tuple[str, bool]:
    """(caption, changed): UTF-8 decoded with replacement, whitespace collapsed, cut to ``max_chars`` at a word."""
    if caption is None:
        return "", False
    changed = False
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            caption, changed = caption.decode("utf-8", errors="replace"), True
    text = re.sub(r"\s+", " ", str(caption)).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        text, changed = (cut.rsplit(" ", 1)[0] if " " in cut else cut), True
    return text, changed
