"""A preallocated key/value cache with one row ("slot") per sequence.

The generation engine steps many sequences together, each at its own length. Every
slot holds one sequence's keys and values at positions 0..len-1; a forward call names the slot of
each batch row and the position of each token, writes the new keys/values there, and attends to
the slot's positions up to each query's own. Buffers are allocated once, so decoding allocates
nothing per token and a finished sequence frees its slot by simply being forgotten.

Positions past a sequence's end are read (masked) when it is batched with longer ones, so they must hold
finite numbers. `zero=True` zeroes every buffer up front; `zero=False` (the engine's choice) leaves them as
allocated and `prepare` zeroes, before each call, the positions of its slots that the call may read and that
were never written or zeroed, ZERO_AHEAD more at a time. So a server sized for many slots of 4096 positions
commits only the memory its sequences reach, and a new engine does not zero 94 MB per SmolVLM-256M slot
(0.55 s of a 5.5 s evaluation run did that when a slot was zeroed whole on first use).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ZERO_AHEAD = 256  # positions zeroed past what a call needs: a decoding slot is zeroed once per 256 steps


class KVCache:
    """Per-layer buffers k, v of shape [max_batch, n_kv_heads, max_seq_len, head_dim]."""

    def __init__(self, num_layers: int, max_batch: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, zero: bool = True) -> None:
        shape = (max_batch, num_kv_heads, max_seq_len, head_dim)
        make = torch.zeros if zero else torch.empty
        self.k = [make(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [make(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        # positions 0 .. clean-1 of each slot hold finite numbers (written or zeroed); every write goes below it
        self._clean = [max_seq_len if zero else 0] * max_batch

    def prepare(self, slots: Iterable[int], kv_len: int) -> None:
        """Make positions 0 .. kv_len-1 of each slot finite before a call that writes below kv_len and reads up to
        it: those never written or zeroed are zeroed (with ZERO_AHEAD more). Nothing written is touched, since
        every write comes after a `prepare` that covers it."""
        for slot in slots:
            clean = self._clean[slot]
            if clean < kv_len:
                end = min(self.max_seq_len, kv_len + ZERO_AHEAD)
                for buf in (*self.k, *self.v):
                    buf[slot, :, clean:end].zero_()
                self._clean[slot] = end

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy positions 0..length-1 of slot src into slot dst, in every layer (finite there from now on)."""
        for buf in (*self.k, *self.v):
            buf[dst, :, :length] = buf[src, :, :length]
        self._clean[dst] = max(self._clean[dst], length)

    def update(self, layer: int, slots: torch.Tensor | None, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, hd] at (slots[b], positions[b, t]); return the slots' first kv_len keys/values.

        `slots` None means rows 0..B-1, which are read as a view instead of a gather.
        """
        b = k.shape[0]
        rows = torch.arange(b, device=k.device) if slots is None else slots
        kc, vc = self.k[layer], self.v[layer]
        kc[rows[:, None], :, positions] = k.transpose(1, 2)  # index [B, T] -> values [B, T, Hkv, hd]
        vc[rows[:, None], :, positions] = v.transpose(1, 2)
        if slots is None:
            return kc[:b, :, :kv_len], vc[:b, :, :kv_len]  # [B, Hkv, L, hd] views
        return kc[slots, :, :kv_len], vc[slots, :, :kv_len]  # [B, Hkv, L, hd] gathered
