"""Synthetic model inputs for tests: prompts with image blocks, pixel batches, a relative closeness check."""

from __future__ import annotations

import torch

from checkpoints import SMOLVLM_IMAGE_TOKEN as IMG


def prompt(n_images_per_row: list[int], seq: int, length: int = 24, seed: int = 1) -> torch.Tensor:
    """input_ids [B, T] with each row's image blocks (seq tokens per frame) placed after a few text ids."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in n_images_per_row:
        ids = torch.randint(3, 1000, (length,), generator=g)
        start = 2
        for _ in range(n):
            ids[start:start + seq] = IMG
            start += seq + 1
        rows.append(ids)
    return torch.stack(rows)


def pixels(batch: int, frames: list[int], size: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pv = torch.zeros(batch, max(frames), 3, size, size)
    for b, n in enumerate(frames):
        pv[b, :n] = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return pv


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    scale = ref.float().abs().max().item()
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x scale {scale:.3g}"
