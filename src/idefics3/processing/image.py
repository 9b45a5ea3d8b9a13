"""Image preprocessing for Idefics3 / SmolVLM: longest-edge resize, tiling, normalisation, batching.

Pure functions that reproduce transformers' PIL image processor (`Idefics3ImageProcessorPil`, v5.24) bit for
bit, because the models were trained on its output:

1. resize so that the longest edge is `size["longest_edge"]` (always; small images are upscaled);
2. resize again so that both sides are multiples of the tile `M = max_image_size["longest_edge"]`;
3. cut M×M tiles row-major and append the whole image resized to M×M (the global image) last; an image that is
   exactly one tile is kept alone (rows = cols = 0). Without splitting, every image is resized to M×M;
4. rescale and normalise; 5. pad the batch with all-zero frames and build `pixel_attention_mask`.

Every resize is a PIL (LANCZOS by default) resize of a uint8 image, so pixels are re-quantised after each step,
exactly as the reference does (resize.py). A working image is a
PIL "RGB" image, or, for float array inputs only, an (H, W, 3) float array that the reference keeps as floats in
[0, 1] and truncates to uint8 around each resize.

Speed without drift: rescale + normalise of uint8 pixels is a per-channel lookup table computed with the
reference's own float operations (float64 product then float32, then float32 `(x - mean) / std`), so every
output value is identical while the whole step costs one gather per frame, written straight into the batch.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Union

import numpy as np
from PIL import Image

from ..device import usable_cores
from .load import to_rgb
from .resize import resize

# Absolute cap of the first resize, as in transformers (`MAX_IMAGE_SIZE`, "4k resolution").
MAX_IMAGE_SIZE = 4096

# A working image: PIL "RGB" (uint8 pixels) or an (H, W, 3) float array in the reference's float convention.
WorkImage = Union[Image.Image, np.ndarray]  # noqa: UP007 - a runtime alias: `|` of these classes needs 3.10+

_SETTING_KEYS = ("do_convert_rgb", "do_resize", "size", "resample", "do_image_splitting", "max_image_size",
                 "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad")


def _edge_dict(value: Any, name: str) -> dict[str, int]:
    """Accept {"longest_edge": n}, {"height": h, "width": w} or a bare int (read as longest_edge)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a dict like {{'longest_edge': 364}}, got {value!r}")
    if isinstance(value, int):
        value = {"longest_edge": value}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict like {{'longest_edge': 364}}, got {value!r}")
    value = {k: v for k, v in value.items() if v is not None}
    ok = "longest_edge" in value or ("height" in value and "width" in value)
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise ValueError(f"{name} must hold a positive int 'longest_edge' (or 'height' and 'width'), got {value!r}")
    return dict(value)


@dataclass
class ImageSettings:
    """The image-processor half of a processor config (`preprocessor_config.json`); defaults are Idefics3-8B's."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 4 * 364})
    resample: int = int(Image.Resampling.LANCZOS)
    do_image_splitting: bool = True
    max_image_size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 364})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] | float = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] | float = (0.5, 0.5, 0.5)
    do_pad: bool = True

    def __post_init__(self) -> None:
        self.size = _edge_dict(self.size, "size")
        self.max_image_size = _edge_dict(self.max_image_size, "max_image_size")
        if "longest_edge" not in self.max_image_size:
            raise ValueError(f"max_image_size needs 'longest_edge' (the tile side), got {self.max_image_size!r}")
        self.resample = int(Image.Resampling(int(self.resample)))
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            setattr(self, name, float(value) if isinstance(value, (int, float)) else tuple(float(v) for v in value))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageSettings:
        """Build from a preprocessor config dict; keys that are not image settings are ignored."""
        return cls(**{k: v for k, v in config.items() if k in _SETTING_KEYS and v is not None})

    def updated(self, **changes: Any) -> ImageSettings:
        unknown = sorted(set(changes) - set(_SETTING_KEYS))
        if unknown:
            raise TypeError(f"unknown image setting(s) {unknown}; valid: {list(_SETTING_KEYS)}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _SETTING_KEYS}
        for name in ("image_mean", "image_std"):
            out[name] = list(out[name]) if isinstance(out[name], tuple) else out[name]
        return out

    @property
    def tile(self) -> int:
        return self.max_image_size["longest_edge"]


# ---------------------------------------------------------------------------------------------- output sizes

def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Size after the first resize: longest side -> `longest_edge`, the other side truncated then made even,
    both >= 1, then scaled down (truncating) if the longest side exceeds MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Size after the second resize: the longest side rounded up to a multiple of `tile`, the other side
    derived from the aspect ratio (truncated) and rounded up too. Slightly distorts the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def grid_shape(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    """(rows, cols) of the tile grid an image of this input size gets; (0, 0) means a single frame."""
    if settings.do_resize:
        height, width = _first_resize_size(height, width, settings.size)
    if not settings.do_image_splitting:
        return 0, 0
    height, width = encoder_size(height, width, settings.tile)
    if height > settings.tile or width > settings.tile:
        return height // settings.tile, width // settings.tile
    return 0, 0


def _first_resize_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    if "longest_edge" in size:
        return longest_edge_size(height, width, size["longest_edge"])
    return size["height"], size["width"]


# ---------------------------------------------------------------------------------------------- resizing

def image_size(image: WorkImage) -> tuple[int, int]:
    """(height, width) of a working image."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return image.shape[0], image.shape[1]


def resize_longest_edge(image: WorkImage, settings: ImageSettings) -> WorkImage:
    """Step 1: the resize to `size` (longest edge, or an explicit height/width)."""
    return resize(image, *_first_resize_size(*image_size(image), settings.size), settings.resample)


def resize_for_encoder(image: WorkImage, settings: ImageSettings) -> WorkImage:
    """Step 2: the resize that makes both sides multiples of the tile."""
    return resize(image, *encoder_size(*image_size(image), settings.tile), settings.resample)


# ---------------------------------------------------------------------------------------------- tiling

def _pixels(image: WorkImage) -> np.ndarray:
    """(H, W, 3) pixels of a working image (a read-only view for PIL images)."""
    return np.asarray(image) if isinstance(image, Image.Image) else image


def split_into_frames(image: WorkImage, settings: ImageSettings) -> tuple[list[np.ndarray], int, int]:
    """Steps 1-3 for one image: the (H, W, 3) frames in model order, and the grid (rows, cols)."""
    if settings.do_resize:
        image = resize_longest_edge(image, settings)
    tile = settings.tile
    if not settings.do_image_splitting:
        return [_pixels(resize(image, tile, tile, settings.resample))], 0, 0
    image = resize_for_encoder(image, settings)
    height, width = image_size(image)
    if height <= tile and width <= tile:
        return [_pixels(image)], 0, 0
    rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
    pixels = _pixels(image)
    frames = [pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    frames.append(_pixels(resize(image, tile, tile, settings.resample)))  # the global image, last
    return frames, rows, cols


# ---------------------------------------------------------------------------------------------- normalising

def _per_channel(value: tuple[float, ...] | float, name: str) -> tuple[float, ...]:
    if isinstance(value, float):
        return (value,) * 3
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {list(value)}")
    return value


@lru_cache(maxsize=16)
def _lookup_table(do_rescale: bool, factor: float, do_normalize: bool,
                  mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) output value of each uint8 input value per channel, computed with the reference's float ops."""
    values = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)  # [C, 256]
    return _rescale_normalize(values, do_rescale, factor, do_normalize, mean, std, channel_axis=0)


def _rescale_normalize(pixels: np.ndarray, do_rescale: bool, factor: float, do_normalize: bool,
                       mean: tuple[float, ...], std: tuple[float, ...], channel_axis: int) -> np.ndarray:
    """The reference's rescale then normalise, elementwise and in its exact dtypes."""
    if do_rescale:
        pixels = (pixels.astype(np.float64) * factor).astype(np.float32)
    if do_normalize:
        if not np.issubdtype(pixels.dtype, np.floating):
            pixels = pixels.astype(np.float32)
        shape = [1] * pixels.ndim
        shape[channel_axis] = 3
        mean_arr = np.array(mean, dtype=pixels.dtype).reshape(shape)
        std_arr = np.array(std, dtype=pixels.dtype).reshape(shape)
        pixels = (pixels - mean_arr) / std_arr
    return pixels


def _write_frame(dest: np.ndarray, frame: np.ndarray, settings: ImageSettings) -> None:
    """Rescale/normalise one (h, w, 3) frame into the top-left corner of `dest` [3, H, W]."""
    height, width = frame.shape[:2]
    mean = _per_channel(settings.image_mean, "image_mean")
    std = _per_channel(settings.image_std, "image_std")
    if frame.dtype == np.uint8 and (settings.do_rescale or settings.do_normalize):
        table = _lookup_table(settings.do_rescale, float(settings.rescale_factor), settings.do_normalize, mean, std)
        for c in range(3):  # a gather per channel; uint8 indices are always in range
            np.take(table[c], frame[:, :, c], out=dest[c, :height, :width], mode="clip")
        return
    values = _rescale_normalize(frame, settings.do_rescale, float(settings.rescale_factor),
                                settings.do_normalize, mean, std, channel_axis=2)
    dest[:, :height, :width] = values.transpose(2, 0, 1)


def _output_dtype(frames: list[list[np.ndarray]], settings: ImageSettings, any_empty_slot: bool) -> np.dtype:
    """float32, except the reference keeps uint8 when nothing rescales, normalises, or pads with a zero frame."""
    if settings.do_rescale or settings.do_normalize or any_empty_slot:
        return np.dtype(np.float32)
    return np.result_type(*[frame.dtype for sample in frames for frame in sample])


def batch_frames(frames: list[list[np.ndarray]], settings: ImageSettings, workers: int = 1) -> dict[str, Any]:
    """Step 4-5 for a batch: per-sample lists of (h, w, 3) frames -> `pixel_values` [B, N, 3, H, W] and
    `pixel_attention_mask` [B, N, H, W] (int64), zero-padded bottom/right and with all-zero frames appended
    to samples with fewer frames. With `do_pad=False` frames are returned unpadded as nested lists."""
    all_frames = [frame for sample in frames for frame in sample]
    if not all_frames:
        raise ValueError("no images found in the batch")
    if not settings.do_pad:
        out = [[np.zeros((3, *f.shape[:2]), dtype=_output_dtype([[f]], settings, False)) for f in sample]
               for sample in frames]
        for sample, frames_in in zip(out, frames):
            for dest, frame in zip(sample, frames_in):
                _write_frame(dest, frame, settings)
        return {"pixel_values": out}
    n_max = max(len(sample) for sample in frames)
    height = max(frame.shape[0] for frame in all_frames)
    width = max(frame.shape[1] for frame in all_frames)
    dtype = _output_dtype(frames, settings, any(len(sample) < n_max for sample in frames))
    pixel_values = np.zeros((len(frames), n_max, 3, height, width), dtype=dtype)  # [B, N, 3, H, W]
    mask = np.zeros((len(frames), n_max, height, width), dtype=np.int64)  # [B, N, H, W]
    slots = [(b, n, frame) for b, sample in enumerate(frames) for n, frame in enumerate(sample)]
    for b, n, frame in slots:
        mask[b, n, :frame.shape[0], :frame.shape[1]] = 1

    def write(slot: tuple[int, int, np.ndarray]) -> None:
        _write_frame(pixel_values[slot[0], slot[1]], slot[2], settings)

    if workers > 1 and len(slots) > 1:  # numpy releases the GIL in the gathers
        list(thread_pool(workers).map(write, slots))
    else:
        for slot in slots:
            write(slot)
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask}


def default_threads() -> int:
    """Threads for image work: the usable cores, at most 8."""
    return max(1, min(8, usable_cores()))


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool per size and per process (a pool inherited through fork has no threads)."""
    return _pool(workers, os.getpid())


@lru_cache(maxsize=8)
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="idefics3-image")


def _decode_shared(jobs: list[Any], convert_rgb: bool, max_pixels: int | None) -> None:
    """An image object passed more than once would be decoded by two threads at once (PIL is not thread-safe
    there): convert such objects once, here, and let every job share the result."""
    seen: dict[int, int] = {}
    for i, image in enumerate(jobs):
        if not isinstance(image, (str, bytes)) and id(image) in seen:
            first = seen[id(image)]
            if not isinstance(jobs[first], _Converted):
                jobs[first] = _Converted(to_rgb(jobs[first], convert_rgb, max_pixels))
            jobs[i] = jobs[first]
        else:
            seen.setdefault(id(image), i)


class _Converted:
    """An image already converted by to_rgb (shared by several jobs)."""

    def __init__(self, image: Any) -> None:
        self.image = image


def preprocess(images: list[list[Any]], settings: ImageSettings, max_pixels: int | None = None,
               workers: int | None = None) -> tuple[dict[str, Any], list[list[tuple[int, int]]]]:
    """Per-sample lists of in-memory images -> (`pixel_values`/`pixel_attention_mask`, per-sample (rows, cols)).

    Images are converted, resized and tiled on `workers` threads (default: the usable cores, at most 8; PIL and
    numpy release the GIL), then written into the batch. The output does not depend on the thread count."""
    workers = default_threads() if workers is None else max(1, workers)
    jobs = [image for sample in images for image in sample]
    if workers > 1 and len(jobs) > 1:
        _decode_shared(jobs, settings.do_convert_rgb, max_pixels)

    def one(image: Any) -> tuple[list[np.ndarray], int, int]:
        if isinstance(image, _Converted):
            return split_into_frames(image.image, settings)
        return split_into_frames(to_rgb(image, settings.do_convert_rgb, max_pixels), settings)

    results = iter(list(thread_pool(workers).map(one, jobs)) if workers > 1 and len(jobs) > 1 else map(one, jobs))
    frames: list[list[np.ndarray]] = []
    grids: list[list[tuple[int, int]]] = []
    for sample in images:
        frames.append([])
        grids.append([])
        for _ in sample:
            tiles, rows, cols = next(results)
            frames[-1].extend(tiles)
            grids[-1].append((rows, cols))
    return batch_frames(frames, settings, workers), grids
