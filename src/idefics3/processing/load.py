"""Turning whatever a user passes as an image into pixels, with clear errors for bad input.

Two entry points:
- `load_image(src)`: a file path, `data:` URI, base64 string, http(s) URL, raw bytes, PIL image, numpy array or
  torch tensor -> an upright PIL "RGB" image. Like transformers' `load_image`, it applies the EXIF orientation and
  converts with `Image.convert("RGB")` (so an alpha channel is dropped, not composited).
- `to_rgb(image)`: the processor's conversion of an in-memory image (PIL, numpy, torch) to RGB, following
  transformers' PIL image processor: transparency is composited over white, arrays are channels-first when the
  first axis has 1, 3 or 4 entries and channels-last otherwise. No EXIF transpose here (the reference applies it
  only to images it loads itself).

Decoding is where untrusted bytes meet memory, so it is guarded: the pixel count is checked against a limit
(decompression bombs) before any pixel is decoded, and every PIL failure (empty, truncated, corrupt, not an
image, unsupported mode) becomes an `ImageLoadError` that names the source and the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_TIMEOUT = 10.0
_DATA_URI = re.compile(r"^data:image/[\w.+-]+(;[\w=.+-]+)*,", re.IGNORECASE)
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")


class ImageLoadError(ValueError):
    """An image that cannot be loaded or converted: missing, empty, truncated, corrupt, too large, zero-sized."""


def default_max_pixels() -> int | None:
    """The default pixel limit: Pillow's own decompression-bomb threshold (`PIL.Image.MAX_IMAGE_PIXELS`)."""
    return Image.MAX_IMAGE_PIXELS


def is_image_like(obj: Any) -> bool:
    """True for the in-memory image types the processor accepts (PIL image, numpy array, torch tensor)."""
    return isinstance(obj, (Image.Image, np.ndarray)) or _is_torch_tensor(obj)


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach") and hasattr(obj, "numpy")


def _short(src: Any) -> str:
    text = src if isinstance(src, str) else repr(src)
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


# ---------------------------------------------------------------------------------------------- decoding

def check_pixel_limit(width: int, height: int, max_pixels: int | None, what: str = "image") -> None:
    """Raise ImageLoadError for a zero-sized image or one with more than `max_pixels` pixels."""
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{what} is zero-sized ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels "
            "(a guard against decompression bombs); pass a larger max_pixels to accept it")


def _decode(data: bytes | str | Path, what: str, max_pixels: int | None) -> Image.Image:
    """Open, size-check, then fully decode an image file or byte string."""
    if isinstance(data, bytes) and not data:
        raise ImageLoadError(f"{what} is empty (0 bytes)")
    if isinstance(data, (str, Path)) and os.path.getsize(data) == 0:
        raise ImageLoadError(f"{what} is an empty file")
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with warnings.catch_warnings():
            # Our own limit is checked just below; Pillow's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"{what} is over Pillow's pixel limit (a guard against decompression bombs): {err} "
                             "Raise PIL.Image.MAX_IMAGE_PIXELS to accept it.") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{what} is not an image file Pillow can read") from err
    except OSError as err:
        raise ImageLoadError(f"{what} could not be opened: {err}") from err
    check_pixel_limit(image.width, image.height, max_pixels, what)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageLoadError(f"{what} is truncated or corrupt: {err}") from err
    return image


def _fetch_url(url: str, timeout: float | None) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "idefics3"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        raise ImageLoadError(f"could not download image {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ImageLoadError(f"could not download image {url} (timeout {timeout}s): {reason}") from err


def _decode_string(src: str, timeout: float | None, max_pixels: int | None) -> Image.Image:
    if src.startswith(("http://", "https://")):
        return _decode(_fetch_url(src, timeout), f"image at {src}", max_pixels)
    if os.path.isfile(src):
        return _decode(src, f"image file {src!r}", max_pixels)
    if os.path.isdir(src):
        raise ImageLoadError(f"{src!r} is a folder, not an image file")
    payload = src
    match = _DATA_URI.match(src)
    if match:
        if ";base64" not in match.group(0).lower():
            raise ImageLoadError(f"data URI {_short(src)} is not base64-encoded")
        payload = src[match.end():]
    elif not _BASE64.match(src) or len(src) < 16:
        what = "no such image file" if "." in src or os.sep in src else "not an image source"
        raise ImageLoadError(f"{what}: {_short(src)} is not an existing file, an http(s) URL, a data: URI or "
                             "base64 data")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageLoadError(f"image source {_short(src)} is neither an existing file nor valid base64 "
                             f"({err})") from err
    return _decode(data, "base64 image data", max_pixels)


def load_image(src: Any, timeout: float | None = DEFAULT_TIMEOUT, max_pixels: int | None = -1) -> Image.Image:
    """Load an image from a path, URL, data URI, base64 string, bytes, PIL image, numpy array or torch tensor.

    Returns an upright (EXIF orientation applied) PIL "RGB" image, as transformers' `load_image` does.
    `max_pixels` bounds width*height before decoding (-1: Pillow's `MAX_IMAGE_PIXELS`; None: no limit).
    """
    if max_pixels == -1:
        max_pixels = default_max_pixels()
    if isinstance(src, Path):
        src = str(src)
    if isinstance(src, str):
        image = _decode_string(src, timeout, max_pixels)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        image = _decode(bytes(src), "image bytes", max_pixels)
    elif isinstance(src, Image.Image):
        check_pixel_limit(src.width, src.height, max_pixels)
        image = src
    elif isinstance(src, np.ndarray) or _is_torch_tensor(src):
        pixels = to_rgb(src, max_pixels=max_pixels)
        if isinstance(pixels, np.ndarray):  # float pixels in [0, 1]: scale and truncate as the reference does
            pixels = (pixels.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
        return pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    else:
        raise TypeError(f"cannot load an image from {type(src).__name__}; pass a path, URL, data URI, base64 "
                        "string, bytes, PIL image, numpy array or torch tensor")
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot convert image (mode {image.mode!r}) to RGB: {err}") from err


# ---------------------------------------------------------------------------------------------- conversion

def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: anything with an alpha band or transparency is composited over white."""
    try:
        image.load()  # decode lazily opened files here, so that bad data fails with a clear message
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, EOFError) as err:
        raise ImageLoadError(f"image (mode {image.mode!r}) is truncated or corrupt: {err}") from err
    except ValueError as err:
        raise ImageLoadError(f"cannot convert image mode {image.mode!r} to RGB: {err}") from err


def _channels_last(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) view of an image array, inferring the layout the way transformers does."""
    if pixels.ndim == 2:
        return pixels[:, :, None]
    if pixels.ndim != 3:
        raise ImageLoadError(f"an image array must have 2 or 3 dimensions, got shape {tuple(pixels.shape)}")
    if pixels.shape[0] in (1, 3, 4):
        return pixels.transpose(1, 2, 0)
    if pixels.shape[2] in (1, 3, 4):
        return pixels
    raise ImageLoadError(f"cannot tell the channel axis of an image array of shape {tuple(pixels.shape)}: "
                         "expected 1, 3 or 4 channels first or last")


def _array_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) pixels: grey is repeated, RGBA composited over white (rounded for integer images)."""
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    if pixels.shape[2] == 4:
        if np.issubdtype(pixels.dtype, np.floating) and (pixels.min() < 0.0 or pixels.max() > 1.0):
            raise ImageLoadError(f"an RGBA float image must lie in [0, 1], got [{pixels.min()}, {pixels.max()}]")
        white = 255 if np.issubdtype(pixels.dtype, np.integer) else 1.0
        alpha = pixels[..., 3:4] / white
        blended = alpha * pixels[..., :3] + (1 - alpha) * white
        return np.round(blended).astype(pixels.dtype) if white == 255 else blended.astype(pixels.dtype)
    return pixels


def _as_numpy(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    tensor = image.detach().cpu()
    if tensor.dtype.is_floating_point and tensor.dtype.itemsize < 4:
        tensor = tensor.float()  # bfloat16 has no numpy dtype; float32 holds its values exactly
    return tensor.numpy()


def to_rgb(image: Any, convert_rgb: bool = True, max_pixels: int | None = None) -> Image.Image | np.ndarray:
    """An in-memory image as the image pipeline's working image: a PIL "RGB" image, or an (H, W, 3) array when
    the input is a non-uint8 array (kept as numbers, as the reference does until its first resize)."""
    if isinstance(image, Image.Image):
        check_pixel_limit(image.width, image.height, max_pixels)
        if convert_rgb:
            return _pil_to_rgb(image)
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ImageLoadError(f"with do_convert_rgb=False an image must have 3 channels, got mode {image.mode!r}")
        return image if image.mode == "RGB" else Image.fromarray(pixels)
    if not (isinstance(image, np.ndarray) or _is_torch_tensor(image)):
        raise TypeError(f"unsupported image type {type(image).__name__}; pass a PIL image, numpy array, torch "
                        "tensor, file path, URL, data URI or base64 string")
    pixels = _channels_last(_as_numpy(image))
    check_pixel_limit(pixels.shape[1], pixels.shape[0], max_pixels, "image array")
    if not (pixels.dtype == np.bool_ or np.issubdtype(pixels.dtype, np.integer)
            or np.issubdtype(pixels.dtype, np.floating)):
        raise ImageLoadError(f"unsupported image array dtype {pixels.dtype}")
    if convert_rgb:
        pixels = _array_to_rgb(pixels)
    if pixels.shape[2] != 3:
        raise ImageLoadError(f"with do_convert_rgb=False an image must have 3 channels, got {pixels.shape[2]}")
    if pixels.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(pixels))
    return pixels
