"""A cache of image features keyed by the content of the pixels, so a second question about the same
image skips the vision encoder.

The key is a BLAKE2 digest of the frames (and their pixel mask) as the processor made them, so the same
picture at the same resolution settings hits, and any other picture or setting misses. The key also
carries the vision weights' identity and in-place version counters: after a training step (or a LoRA
merge) changes the encoder or connector, old entries can no longer be hit. Entries are evicted least
recently used first, within a byte budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch


def _digest(t: torch.Tensor | None, h: Any) -> None:
    if t is None:
        h.update(b"none")
        return
    t = t.detach().contiguous().cpu()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().data if t.dtype != torch.bool else t.numpy().tobytes())


class EncoderCache:
    """LRU map from (weights version, frames digest) to image features [N, S_img, D_text]."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def weights_version(model: torch.nn.Module) -> tuple:
        params = [*model.model.vision_model.parameters(), *model.model.connector.parameters()]
        return (id(model), sum(p._version for p in params), params[0].data_ptr(), params[-1].data_ptr())

    def key(self, model: torch.nn.Module, pixel_values: torch.Tensor,
            pixel_attention_mask: torch.Tensor | None) -> tuple:
        h = hashlib.blake2b(digest_size=20)
        _digest(pixel_values, h)
        _digest(pixel_attention_mask, h)
        return (self.weights_version(model), h.hexdigest())

    def get(self, key: tuple) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: tuple, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            old = self._entries.pop(key)
            self._bytes -= old.numel() * old.element_size()
        self._entries[key] = features
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
