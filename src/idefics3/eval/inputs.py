"""A sample's prompt and images -> what the engine takes: prompt ids, image frames and their digests.

The rules are the processor's (as `idefics3.ask` and the server apply them): the chat template renders one user
turn (the images before the text, unless the text places `<image>` itself), the task's assistant prefix is
appended after the generation prompt, every image is tiled with the checkpoint's settings, and each `<image>`
is expanded into its tile markers and `image_seq_len` tokens per frame.

Image work is the costly part on a CPU (decoding a page scan, resizing, cutting 17 tiles), and benchmarks ask
several questions about one image (DocVQA has about four per page), so the frames of recently seen images are
kept by the digest of their encoded bytes: the second question about a page reuses its frames, their digests
(which then hit the engine's encoder and prefix caches), and its tile grid. This runs on a worker thread, so
the next samples are prepared while the engine generates.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..generation.encoder_cache import frame_digests
from ..loading import user_turn
from ..processing.prompt import expand_prompts
from .data import ImageRef, MemoryImage
from .task import Prompt

KEEP_IMAGES = 32


@dataclass
class Built:
    ids: list[int]
    pixel_values: torch.Tensor | None = None          # [N, 3, H, W]
    pixel_attention_mask: torch.Tensor | None = None  # [N, H, W]
    frame_keys: list[str] | None = None


@dataclass
class _Frames:
    frames: list[np.ndarray]
    masks: list[np.ndarray]
    grid: tuple[int, int]


class InputBuilder:
    """Builds engine inputs with the processor's rules, keeping the frames of recent images."""

    def __init__(self, processor: Any, keep_images: int = KEEP_IMAGES) -> None:
        self.processor = processor
        self.keep_images = keep_images
        self._frames: OrderedDict[str, _Frames] = OrderedDict()
        self.image_hits = 0

    def text(self, prompt: Prompt, n_images: int) -> str:
        """The rendered prompt: the chat template's user turn and generation prompt, then the prefix."""
        turn = user_turn(prompt.text, n_images)
        return self.processor.apply_chat_template([turn], add_generation_prompt=True) + prompt.prefix

    def build(self, prompt: Prompt, images: Sequence[ImageRef | MemoryImage]) -> Built:
        """Raises ImageError for an image that cannot be read, ValueError for a prompt that cannot be built."""
        frames = [self._image(source) for source in images]
        text = self.text(prompt, len(frames))
        p = self.processor
        expanded = expand_prompts([text], [[f.grid for f in frames]], p.image_seq_len, p.tokens)[0]
        bos = p.tokenizer.bos_token
        ids = p.tokenizer(expanded, add_special_tokens=not (bos is not None and expanded.startswith(bos)))["input_ids"]
        if not frames:
            return Built(list(ids))
        pv, pm = _stack([x for f in frames for x in f.frames], [m for f in frames for m in f.masks])
        return Built(list(ids), pv, pm, frame_digests(pv, pm))

    def _image(self, source: ImageRef | MemoryImage) -> _Frames:
        image, digest = source.load()
        cached = self._frames.get(digest)
        if cached is not None:
            self._frames.move_to_end(digest)
            self.image_hits += 1
            return cached
        pixels, grids = self.processor.process_images([[image]])
        pv, pm = pixels["pixel_values"][0], pixels["pixel_attention_mask"][0]
        grid = tuple(grids[0][0])
        n = grid[0] * grid[1] + 1 if grid[0] else 1
        entry = _Frames(list(pv[:n]), list(pm[:n]), grid)
        self._frames[digest] = entry
        while len(self._frames) > self.keep_images:
            self._frames.popitem(last=False)
        return entry


def _stack(frames: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of possibly different sizes -> [N, 3, H, W] zero-padded to the largest, with masks [N, H, W]: the
    padding the processor gives the frames of one prompt."""
    h = max(f.shape[-2] for f in frames)
    w = max(f.shape[-1] for f in frames)
    pv = torch.zeros(len(frames), frames[0].shape[0], h, w, dtype=torch.from_numpy(np.asarray(frames[0])).dtype)
    pm = torch.zeros(len(frames), h, w, dtype=torch.bool)
    for i, (f, m) in enumerate(zip(frames, masks)):
        pv[i, :, :f.shape[-2], :f.shape[-1]] = torch.from_numpy(np.ascontiguousarray(f))
        pm[i, :m.shape[-2], :m.shape[-1]] = torch.from_numpy(np.ascontiguousarray(m)).bool()
    return pv, pm
