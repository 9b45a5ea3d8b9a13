"""Resizing exactly like the reference: PIL on uint8 pixels, and the reference's conventions for float arrays.

The reference converts every image to a PIL image for each resize and back to an array after it. For uint8
pixels that round trip is lossless, so a working image that is a PIL "RGB" image is simply resized with PIL.
Float arrays are different: integral values in [0, 255] are cast to uint8; other values must lie in [0, 1] and
are multiplied by 255 (float64 product, float32 result) and truncated to uint8, and after the resize they are
brought back as float32 `uint8 / 255`. `resize` follows those rules step by step.

A single resize is deliberately not split over threads: Pillow 13 picks the order of its two passes (horizontal
then vertical, or the reverse) from the sizes, and a split that assumes one order is not byte-identical.
Parallelism happens across images instead (image.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _to_uint8_for_pil(pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """The reference's array -> PIL rule. Returns (uint8 pixels, whether they were scaled by 255)."""
    if pixels.dtype == np.uint8:
        return pixels, False
    if np.allclose(pixels, pixels.astype(int)):
        if pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(f"image values must lie in [0, 255], got [{pixels.min()}, {pixels.max()}]")
        return pixels.astype(np.uint8), False
    if pixels.min() < 0 or pixels.max() > 1:
        raise ValueError("a float image that is not integral must lie in [0, 1], "
                         f"got [{pixels.min()}, {pixels.max()}]")
    return (pixels.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True


def resize(image: Image.Image | np.ndarray, height: int, width: int, resample: int) -> Image.Image | np.ndarray:
    """Resize a working image: a PIL "RGB" image, or an (H, W, 3) float array in the reference's convention."""
    if isinstance(image, Image.Image):
        if image.size == (width, height):  # PIL would return a copy; working images are never modified
            return image
        return image.resize((width, height), resample=resample)
    pixels, scaled = _to_uint8_for_pil(image)
    resized = Image.fromarray(pixels).resize((width, height), resample=resample)
    if not scaled:
        return resized
    return (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
