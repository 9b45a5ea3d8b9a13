"""Attention on CPU as one C++ call (cpu_attention.cpp): bf16 flash attention on vdpbf16ps, for the vision
encoder (bidirectional, padded patches masked) and the text prefill (causal, GQA, after a cached prefix or not).

    y = vision_attention(q, k, v, key_mask, num_heads)   # [N, S, D] projections in and out, or None
    y = text_attention(q, k, v, mask, is_causal)         # [B, H, T, hd] / [B, Hkv, L, hd] in, [B, T, H, hd] out

q, k and v are read where they are (the projections' output, the column blocks of a fused q/k/v projection,
the KV cache), and the result comes in the [.., T, H, hd] layout the output projection reads. None means the
kernel does not apply (another dtype or device, autograd recording, a head size it lacks, a mask that is not
"keys up to a limit", a CPU without AVX512-BF16, IDEFICS3_KERNELS=0, a failed build) and the caller takes
`F.scaled_dot_product_attention`.

Measured on SigLIP-base shapes ([2 frames, 1024 patches, 12 heads of 64], one thread): 46 ms against aten's
flash attention at 98 ms, i.e. 140 against 66 GFLOP/s, next to 190 GFLOP/s for a bf16 linear layer of the
same encoder. The result agrees with aten's bf16 attention to bf16 rounding: both take fp32 scores and sums
and round the probabilities to bf16 before the second product (tests/kernels/test_cpu_attention.py).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from .build import compile_library, kernels_enabled, log_once, missing_cpu_features

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
MAX_HEAD_DIM = 128  # the kernel keeps a row's outputs in up to 8 registers of 16


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | str:
    """The compiled attention kernel with its signature declared, or why it could not be built."""
    lib = compile_library("idefics3_cpu_attention", SOURCE)
    if isinstance(lib, str):
        return lib
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.idefics3_attention.restype = ctypes.c_int
    lib.idefics3_attention.argtypes = [ptr, ptr, ptr, ptr, *[i64] * 6, ptr, ptr, ptr, ptr, ctypes.c_float,
                                       ctypes.c_int]
    return lib


def unsupported_reason(q: torch.Tensor, head_dim: int) -> str | None:
    """Why the kernel cannot run on `q` here, or None when it can (no build involved)."""
    if not kernels_enabled():
        return "IDEFICS3_KERNELS=0"
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return f"no kernel for {q.dtype} on {q.device.type}"
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        return f"head size {head_dim} is odd or above {MAX_HEAD_DIM}"
    missing = missing_cpu_features(bf16=True)
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can take q [B, H, T, hd], k, v [B, Hkv, L, hd] here (the reason logged once if not).
    Cheap: callers ask before building masks for it."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return False  # training: autograd needs the aten op
    b, h, _, hd = q.shape
    reason = unsupported_reason(q, hd)
    if reason is None and (k.shape != v.shape or k.shape[0] != b or k.shape[3] != hd or h % k.shape[1]
                           or k.dtype != q.dtype or v.dtype != q.dtype):
        reason = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together"
    if reason is not None:
        log_once(logging.INFO, f"attention kernel off: {reason}")
        return False
    lib = load_library()
    if isinstance(lib, str):
        log_once(logging.WARNING, lib + "; attention stays on aten")
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None,
              limits: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(hd)) v for q [B, H, T, hd] and k, v [B, Hkv, L, hd] (any strides), over all keys,
    the keys where key_valid [B, L] is true, or for query (b, t) the keys j < limits[b, t]. Returns a
    contiguous [B, T, H, hd], or None where the kernel does not apply (the reason logged once)."""
    if not _usable(q, k, v):
        return None
    return _run(q, k, v, key_valid, limits)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
         limits: torch.Tensor | None) -> torch.Tensor | None:
    b, h, t, hd = q.shape
    lib = load_library()
    if q.stride(3) != 1:
        q = q.contiguous()
    if k.stride(3) != 1 or v.stride(3) != 1 or k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    if key_valid is not None:
        key_valid = key_valid.to(torch.uint8).contiguous()  # [B, L]
        if not bool(key_valid.any(dim=1).all()):
            return None  # a frame without a valid key: leave it to aten, whatever it makes of it
    if limits is not None:
        limits = limits.to(torch.int64).contiguous()  # [B, T]
    out = torch.empty(b, t, h, hd, dtype=q.dtype)  # [B, T, H, hd]
    qs = (ctypes.c_int64 * 3)(q.stride(0), q.stride(1), q.stride(2))
    ks = (ctypes.c_int64 * 3)(k.stride(0), k.stride(1), k.stride(2))
    rc = lib.idefics3_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, k.shape[1], t,
                                k.shape[2], hd, qs, ks, None if key_valid is None else key_valid.data_ptr(),
                                None if limits is None else limits.data_ptr(), hd ** -0.5,
                                torch.get_num_threads())
    return out if rc == 0 else None


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                     num_heads: int) -> torch.Tensor | None:
    """Bidirectional attention of [N, S, H * hd] projections (contiguous, or column blocks of one fused
    projection, read in place) over the patches where key_mask [N, 1, 1, S] is true: [N, S, D], or None."""
    n, s, d = q.shape
    heads = [x.view(n, s, num_heads, d // num_heads).transpose(1, 2) for x in (q, k, v)]  # [N, H, S, hd]
    key_valid = None if key_mask is None else key_mask.reshape(n, s)  # [N, S]
    y = attention(*heads, key_valid=key_valid)  # [N, S, H, hd]
    return None if y is None else y.view(n, s, d)


_last_mask: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # every layer of a forward passes the same mask


def _prefix_limits(mask: torch.Tensor) -> torch.Tensor | None:
    """For a bool mask [B, 1, T, L] whose rows are each "keys 0..n-1" (n >= 1): n as [B, T]; else None.
    Checked once per mask object: the layers of one forward share it."""
    if _last_mask and _last_mask[0][0] is mask:
        return _last_mask[0][1]
    limits = mask[:, 0].sum(-1)  # [B, T]
    keys = torch.arange(mask.shape[-1])
    if not bool((mask[:, 0] == (keys < limits[..., None])).all()) or not bool((limits > 0).all()):
        limits = None
    _last_mask[:] = [(mask, limits)]
    return limits


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool) -> torch.Tensor | None:
    """The decoder's attention as SDPA computes it with (attn_mask=mask, is_causal, enable_gqa): q [B, H, T, hd],
    k, v [B, Hkv, L, hd] -> [B, T, H, hd], or None (also when the bool mask [B, 1, T, L] is not, row by row,
    the keys before some limit: left padding, for one)."""
    if not _usable(q, k, v):
        return None  # before any mask work: an fp32 model, for one, never gets here
    b, _, t, _ = q.shape
    length = k.shape[2]
    limits = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (b, 1, t, length):
            return None
        limits = _prefix_limits(mask)
        if limits is None:
            return None
    elif is_causal:  # SDPA's causal mask is top-left aligned: query t sees keys 0..t
        limits = torch.arange(1, t + 1).clamp(max=length).expand(b, t)
    return _run(q, k, v, None, limits)
