"""Decoding one image file to the uint8 array every face set yields, refusing what would
mislead or exhaust memory: missing, corrupt or truncated files and images over a pixel limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from faceemd.data.errors import BadImageError, ImageTooLargeError

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "read_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Larger images are refused before they are decoded (a 20000 x 20000 JPEG of 6 MB decodes to
# 1.2 GB); face sets take ``max_pixels`` to change it.
MAX_PIXELS = 40_000_000


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to uint8 ``(H, W)`` (grayscale) or ``(H, W, 3)`` RGB, as a viewer shows it.

    A missing, corrupt or *truncated* file (libjpeg only warns about a premature end: the
    rest of the image would be grey) is a :class:`BadImageError` naming it, as is an image
    of more than ``max_pixels`` pixels (checked from the header, before decoding). The EXIF
    orientation tag is applied (a phone photo stored sideways comes out upright); 16-bit
    images are converted exactly (``round(x / 257)``), not stretched per image; palette,
    alpha and CMYK images become RGB.
    """
    hint = "fix or remove it, or set data.on_bad_image=skip to skip it"
    if not path.is_file():
        what = "a symbolic link that loops or leads nowhere" if path.is_symlink() else "missing"
        raise BadImageError(f"image {path} is {what}; {hint}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ImageTooLargeError(
                    f"image {path} is {im.width}x{im.height} pixels, above the limit of "
                    f"{max_pixels:,} (max_pixels of the data set); downscale it or raise the limit"
                )
            im.load()  # raises on a truncated or corrupt file
            im = ImageOps.exif_transpose(im)
            data = _to_uint8(im)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(
            f"image {path} cannot be decoded ({err.__class__.__name__}: {err}); {hint}"
        ) from err
    return data


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Grayscale ``(H, W)`` or RGB ``(H, W, 3)`` uint8 from any Pillow mode."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        x = np.asarray(im, dtype=np.float64)
        if x.min() < 0 or x.max() > 65535:
            raise ValueError(f"integer image values outside 0..65535 (mode {im.mode})")
        return np.round(x / 257.0).astype(np.uint8)
    if im.mode in ("L", "RGB"):
        return np.asarray(im, dtype=np.uint8).copy()
    if im.mode in ("1", "LA"):
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
