"""Prefix caching across requests: the KV-cache slots, and what each free slot still holds.

A multi-turn chat resends the whole conversation, images included, every turn. When a sequence finishes, its
slot keeps its keys and values; the pool remembers which prompt keys (sequence.py: token ids, with image
positions keyed by their frame's content digest) they belong to. A new sequence takes the free slot holding
the longest common prefix of its keys and prefills only the rest; when the longest prefix sits in a slot that
is still in use (another question about the same image, still running), it is copied into the new slot.

Why slots and not pages: the engine's cache is one preallocated row per sequence (model/kv_cache.py), which the
fused CPU decoder reads directly. The memory is bounded by construction (the engine's `prefix_cache_slots`
adds rows that only hold finished conversations), eviction is least recently used, and a hit is exact: keys
at position i depend only on the keys of positions 0..i, which the match compares, images included.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from .sequence import common_prefix

MIN_REUSE = 4  # a shorter common prefix (a BOS, a role marker) is not worth a copy


@dataclass
class _Held:
    keys: list[int]  # the keys of positions 0..len(keys)-1 held by the slot


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    prompt_tokens: int = 0


class SlotPool:
    """The free slots of a KV cache in least-recently-released order, each with what it still holds."""

    def __init__(self, n_slots: int, enabled: bool = True) -> None:
        self.n_slots = n_slots
        self.enabled = enabled
        self._free: OrderedDict[int, _Held | None] = OrderedDict((s, None) for s in range(n_slots))
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._free)

    def free_slots(self) -> list[int]:
        return list(self._free)

    def release(self, slot: int, keys: list[int] | None = None) -> None:
        """Free a slot; keys: what its positions 0..len(keys)-1 now hold (None: nothing reusable)."""
        self._free[slot] = _Held(keys) if (self.enabled and keys) else None
        self._free.move_to_end(slot)

    def take(self, keys: list[int], occupied: Iterable[tuple[int, list[int], int]]) -> tuple[int, int, int | None]:
        """A slot for a prompt with these keys: (slot, reusable length, slot to copy that prefix from or None).

        occupied: (slot, keys, how many of them it holds) of the slots in use. The reusable length stops one
        short of the whole
        prompt, because the last prompt token must run to give the first logits.
        """
        limit = len(keys) - 1
        best_len, best_slot, in_use = 0, None, False
        if self.enabled and limit >= MIN_REUSE:
            self.stats.lookups += 1
            self.stats.prompt_tokens += len(keys)
            for slot, held in self._free.items():
                if held is not None:
                    n = common_prefix(keys, held.keys, limit)
                    if n > best_len:
                        best_len, best_slot, in_use = n, slot, False
            for slot, held_keys, held in occupied:
                n = common_prefix(keys, held_keys, min(limit, held))
                if n > best_len:
                    best_len, best_slot, in_use = n, slot, True
        if best_len < MIN_REUSE:
            best_len, best_slot = 0, None
        if best_slot is not None:
            self.stats.hits += 1
            self.stats.reused_tokens += best_len
        if best_slot is not None and not in_use:
            del self._free[best_slot]
            return best_slot, best_len, None
        slot, _ = self._free.popitem(last=False)  # the least recently released
        return slot, best_len, best_slot
