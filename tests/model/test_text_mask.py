"""build_mask: the cached prefill from position 0 takes SDPA's causal path, and it computes what the mask does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from idefics3.model.text import build_mask


def test_cached_prefill_from_the_start_is_plain_causal():
    positions = torch.arange(7)[None].repeat(2, 1)  # [B, T]
    assert build_mask(positions, None, cached=True, kv_len=7) == (None, True)
    mask, causal = build_mask(positions + 3, None, cached=True, kv_len=10)  # after a cached prefix: a real mask
    assert mask is not None and not causal and mask.shape == (2, 1, 7, 10)
    ragged = torch.tensor([[0, 1, 2, 3], [0, 1, 5, 6]])
    assert build_mask(ragged, None, cached=True, kv_len=4)[0] is not None


def test_the_causal_flag_equals_the_explicit_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 33, 16, generator=g) for _ in range(3))
    positions = torch.arange(33)[None]
    keys = torch.arange(33)
    explicit = (keys[None, None, None, :] <= positions[:, None, :, None])  # what the cached path builds otherwise
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=explicit)
    b = F.scaled_dot_product_attention(q, k, v, is_causal=build_mask(positions, None, True, 33)[1])
    assert torch.allclose(a, b, atol=1e-6)
