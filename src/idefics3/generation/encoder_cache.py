"""Image features cached by the content of each frame, so a second question about the same image skips the
vision encoder.

A frame's key is a BLAKE2 digest of its pixels (and its pixel mask) exactly as the processor made them, so the
same picture at the same resolution settings hits, and any other picture or setting misses. The same digests
key the prefix cache's image positions (sequence.py). The cache key also carries the vision weights' identity
and in-place version counters: after a training step (or a LoRA merge) changes the encoder or connector, old
entries can no longer be hit. Entries are evicted least recently used first, within a byte budget. A lock
makes every operation atomic, so a thread that encodes images ahead (eval/runner.py) can fill the cache while
the engine reads it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch


def frame_digests(frames: torch.Tensor | None, masks: torch.Tensor | None = None) -> list[str]:
    """One hex digest per frame of pixels [N, 3, H, W] (+ mask [N, H, W]) or of features [N, S, D]."""
    if frames is None:
        return []
    frames = frames.detach().contiguous().cpu()
    masks = None if masks is None else masks.detach().to(torch.bool).contiguous().cpu()
    out = []
    for i in range(frames.shape[0]):
        h = hashlib.blake2b(digest_size=20)
        frame = frames[i]
        h.update(f"{tuple(frame.shape)}{frame.dtype}".encode())
        h.update(frame.reshape(-1).view(torch.uint8).numpy().data)
        h.update(b"none" if masks is None else masks[i].numpy().tobytes())
        out.append(h.hexdigest())
    return out


class EncoderCache:
    """LRU map from (weights version, frame digest) to one frame's image features [S_img, D_text]."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0    # frames
        self.misses = 0  # frames
        self._lock = threading.Lock()

    @staticmethod
    def weights_version(model: torch.nn.Module) -> tuple:
        params = [*model.model.vision_model.parameters(), *model.model.connector.parameters()]
        return (id(model), sum(p._version for p in params), params[0].data_ptr(), params[-1].data_ptr())

    def __getstate__(self) -> dict:  # copies and pickles (a deep-copied model) get a lock of their own
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def __contains__(self, key: tuple) -> bool:
        """Whether the key is cached (counted neither as a hit nor as a miss)."""
        with self._lock:
            return key in self._entries

    def put(self, key: tuple, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                old = self._entries.pop(key)
                self._bytes -= old.numel() * old.element_size()
            self._entries[key] = features
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes
