"""Synthetic model inputs for tests: prompts with image blocks, pixel batches, a relative closeness check, and
the greedy tokens an engine gives for a list of prompts."""

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


def engine_tokens(engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Add every prompt to `engine`, step it to completion; each prompt's generated token ids, in order."""
    from idefics3 import SamplingParams
    from idefics3.generation.engine import Request

    ids = [engine.add(Request(p, SamplingParams(max_new_tokens=max_new_tokens))) for p in prompts]
    out = {i: [] for i in ids}
    while engine.has_work():
        for ev in engine.step():
            out[ev.seq_id].append(ev.token_id)
    return [out[i] for i in ids]
