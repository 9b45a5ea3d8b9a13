"""Weights derived from a model's own (stacked, repacked copies), owned by the kernel backend that made them.

A kernel often runs faster on another layout of the same weights: the vision encoder's q, k and v stacked
into one matrix, the decoder's matrices in 32-column tiles for batched decode. `DerivedWeights.get` makes
such a copy once, keyed by who needs it, and makes it again whenever a source tensor is replaced or changed
in place (the key holds each source's address and version counter). The backend owns one store, so its
memory is counted (`nbytes`, shown by `idefics3 info` and the benches) and freed with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class DerivedWeights:
    """Copies of weights computed from sources, each remade when a source changes."""

    def __init__(self) -> None:
        self._items: dict[tuple[int, str], tuple[tuple, Any]] = {}

    def get(self, owner: object, name: str, sources: list[torch.Tensor], make: Callable[[], T]) -> T:
        """`make()` for (owner, name), cached while none of `sources` changed."""
        key = tuple((t.data_ptr(), t._version) for t in sources)
        slot = (id(owner), name)
        cached = self._items.get(slot)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, make())
            self._items[slot] = cached
        return cached[1]

    def drop(self, owner: object, name: str) -> None:
        """Free the copy made for (owner, name), if any (a later `get` makes it again)."""
        self._items.pop((id(owner), name), None)

    def nbytes(self) -> int:
        """Bytes held by the copies."""
        return sum(_nbytes(value) for _, value in self._items.values())

    def clear(self) -> None:
        self._items.clear()
