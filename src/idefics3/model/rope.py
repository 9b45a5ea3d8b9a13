"""Rotary position embeddings of the Llama decoder: default and Llama-3.1 ("llama3") frequency scaling.

Frequencies are computed in float32 exactly as the reference does, and the cos/sin table is built once
per device up to the longest position seen (grown by doubling), then gathered by position id. A
gathered row is bit-identical to computing `pos * inv_freq` on the fly, so caching changes nothing.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, with llama3 scaling when `scaling` says so."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig = scaling["original_max_position_embeddings"]
    low_wl, high_wl = orig / low, orig / high
    wavelen = 2 * math.pi / inv  # inv is on the CPU even under a meta-device context
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)  # long wavelengths: slowed down by `factor`
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(medium, blended, scaled)


class RotaryTable:
    """cos/sin for positions [.., T] -> two [.., T, head_dim] tensors in the requested dtype."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self._cos: torch.Tensor | None = None  # [L, head_dim] float32
        self._sin: torch.Tensor | None = None

    def _grow(self, length: int, device: torch.device) -> None:
        size = max(length, 256)
        if self._cos is not None and self._cos.device == device:
            size = max(size, 2 * self._cos.shape[0])
        inv = self.inv_freq.to(device)
        pos = torch.arange(size, device=device, dtype=torch.int64).float()
        freqs = pos[:, None] * inv[None, :]  # [L, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
        self._cos, self._sin = emb.cos(), emb.sin()

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype,
                 needed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """needed: 1 + the largest position, when known (else read from the tensor: a host sync)."""
        if needed is None:
            needed = int(position_ids.max()) + 1 if position_ids.numel() else 1
        if self._cos is None or self._cos.device != position_ids.device or self._cos.shape[0] < needed:
            self._grow(needed, position_ids.device)
        return self._cos[position_ids].to(dtype), self._sin[position_ids].to(dtype)

    def cos_sin_for_max(self, max_position: int, device: torch.device) -> None:
        """Build the table up front (e.g. before CUDA-graph capture, where growing is not allowed)."""
        if self._cos is None or self._cos.device != device or self._cos.shape[0] < max_position:
            self._grow(max_position, device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [B, T, hd] (half-split layout)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
