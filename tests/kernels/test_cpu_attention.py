"""The vision encoder's C++ attention: as accurate as aten's bf16 attention, masks exact, clean fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idefics3.kernels import build, cpu_attention
from idefics3.kernels.cpu_attention import text_attention, vision_attention


@pytest.fixture(autouse=True)
def kernel(attention_kernel):
    """Every test here needs the kernel (conftest.attention_kernel skips otherwise)."""


def qkv(n: int, s: int, heads: int, hd: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, s, heads * hd, generator=g).mul(2).bfloat16() for _ in range(3)]  # [N, S, D]


def reference(q, k, v, key_mask, heads, dtype):
    n, s, d = q.shape
    q, k, v = (t.to(dtype).view(n, s, heads, d // heads).transpose(1, 2) for t in (q, k, v))  # [N, H, S, hd]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [N, H, S, hd]
    return y.transpose(1, 2).reshape(n, s, d).float()  # [N, S, D]


@pytest.mark.parametrize("n, s, heads, hd", [(2, 256, 4, 64), (1, 729, 2, 72), (3, 16, 4, 24), (1, 100, 2, 128),
                                             (2, 37, 3, 8), (1, 1, 2, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_fp32_as_closely_as_aten_bf16(n, s, heads, hd, masked):
    q, k, v = qkv(n, s, heads, hd)
    key_mask = None
    if masked:
        keep = torch.rand(n, s, generator=torch.Generator().manual_seed(3)) < 0.6
        keep[:, 0] = True  # every frame keeps a patch
        key_mask = keep.view(n, 1, 1, s)  # [N, 1, 1, S] like the encoder's
    with torch.inference_mode():
        ours = vision_attention(q, k, v, key_mask, heads)
        exact = reference(q, k, v, key_mask, heads, torch.float32)
        aten = reference(q, k, v, key_mask, heads, torch.bfloat16)
    assert ours is not None and ours.shape == q.shape and ours.dtype == torch.bfloat16
    ours_err = (ours.float() - exact).abs().max().item()
    aten_err = (aten - exact).abs().max().item()
    assert ours_err <= 1.5 * aten_err + 1e-3, (ours_err, aten_err)
    assert ours_err <= 0.02 * exact.abs().max().item()


def test_masked_keys_are_ignored_whatever_they_hold():
    q, k, v = qkv(2, 90, 2, 32)
    keep = torch.ones(2, 90, dtype=torch.bool)
    keep[0, 50:] = False
    keep[1, ::3] = False
    k2, v2 = k.clone(), v.clone()
    k2[~keep], v2[~keep] = 1e4, -1e4  # masked rows of k and v: any value, no effect
    mask = keep.view(2, 1, 1, 90)
    with torch.inference_mode():
        assert torch.equal(vision_attention(q, k, v, mask, 2), vision_attention(q, k2, v2, mask, 2))
        alone = vision_attention(q[:1, :50], k[:1, :50], v[:1, :50], None, 2)  # the first frame's valid keys
        full = vision_attention(q[:1], k[:1], v[:1], mask[:1], 2)
    assert torch.equal(alone, full[:, :50])


def test_threads_do_not_change_the_result():
    q, k, v = qkv(2, 200, 4, 64, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            one = vision_attention(q, k, v, None, 4)
        torch.set_num_threads(max(2, threads))
        with torch.inference_mode():
            many = vision_attention(q, k, v, None, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_declines_where_it_does_not_apply(monkeypatch):
    q, k, v = qkv(1, 20, 2, 32)
    with torch.inference_mode():
        assert vision_attention(q.float(), k.float(), v.float(), None, 2) is None  # fp32: aten's
        assert vision_attention(*qkv(1, 20, 2, 33)[:3], None, 2) is None  # odd head size
        assert vision_attention(*qkv(1, 20, 1, 130)[:3], None, 1) is None  # above 128
        assert vision_attention(q, k, v, torch.zeros(1, 1, 1, 20, dtype=torch.bool), 2) is None  # no valid key
    q.requires_grad_(True)
    assert vision_attention(q, k, v, None, 2) is None  # autograd recording: aten's
    q.requires_grad_(False)
    monkeypatch.setenv("IDEFICS3_KERNELS", "0")
    with torch.inference_mode():
        assert vision_attention(q, k, v, None, 2) is None


def test_a_failed_build_falls_back_with_its_reason(monkeypatch):
    monkeypatch.setattr(cpu_attention, "load_library", lambda: "the kernel cpu_attention.cpp did not build (no g++)")
    if not build.missing_cpu_features(bf16=True):
        reason = cpu_attention.unsupported_reason(torch.bfloat16, torch.device("cpu"), 32)
        assert "did not build" in reason  # what the backend records for the attention ops
    q, k, v = qkv(1, 20, 2, 32)
    with torch.inference_mode():
        assert vision_attention(q, k, v, None, 2) is None


def test_reads_the_column_blocks_of_a_fused_projection_in_place():
    q, k, v = qkv(2, 70, 3, 32, seed=9)
    fused = torch.cat([q, k, v], dim=-1)  # [N, S, 3D], as one q/k/v multiply writes it
    views = fused.split(q.shape[-1], dim=-1)
    assert not views[0].is_contiguous()
    with torch.inference_mode():
        assert torch.equal(vision_attention(*views, None, 3), vision_attention(q, k, v, None, 3))


def sdpa_text(q, k, v, mask, is_causal):
    b, h, t, hd = q.shape
    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal,
                                       enable_gqa=True)  # [B, H, T, hd]
    return y.transpose(1, 2)  # [B, T, H, hd]


def cache_like(b, h, hkv, t, length, hd, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, hd, generator=g).bfloat16().transpose(1, 2)  # [B, H, T, hd] view, as the model has it
    k, v = (torch.randn(b + 1, hkv, length + 5, hd, generator=g).bfloat16()[1:, :, :length] for _ in range(2))
    return q, k, v  # k, v: slices of a bigger cache, [B, Hkv, L, hd]


@pytest.mark.parametrize("h, hkv, hd", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 1, 72)])
def test_text_causal_prefill_matches_sdpa(h, hkv, hd):
    q, k, v = cache_like(2, h, hkv, 70, 70, hd)
    with torch.inference_mode():
        ours = text_attention(q, k, v, None, True)
        aten = sdpa_text(q.bfloat16(), k, v, None, True)  # bf16 inputs, fp32 maths
    assert ours is not None and ours.shape == (2, 70, h, hd)
    assert (ours.float() - aten).abs().max() <= 0.02 * aten.abs().max()


def test_text_prefill_after_a_cached_prefix_and_batched_rows():
    q, k, v = cache_like(2, 6, 2, 40, 100, 32, seed=1)
    positions = torch.stack([torch.arange(60, 100), torch.arange(30, 70)])  # [B, T]: row 1 ends at 70 of 100
    keys = torch.arange(100)
    mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, L], as build_mask makes it
    with torch.inference_mode():
        ours = text_attention(q, k, v, mask, False)
        aten = sdpa_text(q, k, v, mask, False)
    assert ours is not None
    assert (ours.float() - aten).abs().max() <= 0.02 * aten.abs().max()


def test_text_declines_masks_that_are_not_a_prefix():
    q, k, v = cache_like(1, 4, 2, 20, 20, 32)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()[None, None]  # [1, 1, T, L]
    left_padded = causal & (torch.arange(20) >= 3)[None, None, None, :]
    left_padded |= torch.eye(20, dtype=torch.bool)
    with torch.inference_mode():
        assert text_attention(q, k, v, causal, False) is not None
        assert text_attention(q, k, v, left_padded, False) is None


def test_a_first_build_says_so_once(monkeypatch, caplog):
    """A build that is not yet in the extension cache logs one line (the CLI shows it) before compiling."""
    monkeypatch.setattr(build, "_built_before", lambda name, source: False)
    caplog.set_level("INFO", logger="idefics3.kernels.build")
    build.compile_library.__wrapped__("idefics3_cpu_attention", cpu_attention.SOURCE)
    assert caplog.text.count("compiling CPU kernels") == 1
    caplog.clear()
    monkeypatch.setattr(build, "_built_before", lambda name, source: True)
    build.compile_library.__wrapped__("idefics3_cpu_attention", cpu_attention.SOURCE)
    assert "compiling" not in caplog.text
