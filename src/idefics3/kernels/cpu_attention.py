"""Attention on CPU as one C++ call (cpu_attention.cpp): bf16 flash attention on vdpbf16ps, for the vision
encoder (bidirectional, padded patches masked) and the text prefill (causal, GQA, after a cached prefix or not).

    y = vision_attention(q, k, v, key_mask, num_heads)   # [N, S, D] projections in and out, or None
    y = text_attention(q, k, v, mask, is_causal)         # [B, H, T, hd] / [B, Hkv, L, hd] in, [B, T, H, hd] out

q, k and v are read where they are (the projections' output, the column blocks of a fused q/k/v projection,
the KV cache), and the result comes in the [.., T, H, hd] layout the output projection reads. Whether the
kernel runs at all on this machine (bf16 CPU model, AVX512-BF16, a successful build) is decided once, when the
backend is installed (`unsupported_reason`, backend.py); per call, None means it does not apply to these
tensors (another dtype or device, autograd recording, shapes that do not fit, a mask that is not "keys up to
a limit") and the caller takes `F.scaled_dot_product_attention`.

Measured on SigLIP-base shapes ([2 frames, 1024 patches, 12 heads of 64], one thread): 46 ms against aten's
flash attention at 98 ms, i.e. 140 against 66 GFLOP/s, next to 190 GFLOP/s for a bf16 linear layer of the
same encoder. The result agrees with aten's bf16 attention to bf16 rounding: both take fp32 scores and sums
and round the probabilities to bf16 before the second product (tests/kernels/test_cpu_attention.py).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .build import ENV_SWITCH, compile_library, kernels_enabled, missing_cpu_features

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


def unsupported_reason(dtype: torch.dtype, device: torch.device, head_dim: int) -> str | None:
    """Why the kernel cannot serve a model of this dtype, device and head size here, or None when it can
    (the build included)."""
    if not kernels_enabled():
        return f"{ENV_SWITCH}=0"
    if device.type != "cpu" or dtype != torch.bfloat16:
        return f"no kernel for {dtype} on {device.type} (bf16 on CPU only)"
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        return f"head size {head_dim} is odd or above {MAX_HEAD_DIM}"
    missing = missing_cpu_features(bf16=True)
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    lib = load_library()
    return lib if isinstance(lib, str) else None


def _usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes q [B, H, T, hd], k, v [B, Hkv, L, hd]. Cheap: callers ask before building masks."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return False  # training: autograd needs the aten op
    b, h, _, hd = q.shape
    fits = (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape == v.shape and k.shape[0] == b and k.shape[3] == hd and h % k.shape[1] == 0
            and hd % 2 == 0 and hd <= MAX_HEAD_DIM)
    return fits and kernels_enabled() and _machine_ready()


@functools.lru_cache(maxsize=1)
def _machine_ready() -> bool:
    """This CPU has AVX512-BF16 and the kernel built (a fact of the machine, looked up once)."""
    return not missing_cpu_features(bf16=True) and not isinstance(load_library(), str)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None,
              limits: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(hd)) v for q [B, H, T, hd] and k, v [B, Hkv, L, hd] (any strides), over all keys,
    the keys where key_valid [B, L] is true, or for query (b, t) the keys j < limits[b, t]. Returns a
    contiguous [B, T, H, hd], or None where the kernel does not apply."""
    if not _usable(q, k, v):
        return None
    return _run(q, k, v, key_valid, limits)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
         limits: torch.Tensor | None) -> torch.Tensor | None:
    b, h, t, hd = q.shape
    lib = load_library()
    if isinstance(lib, str):
        return None
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


def prefix_limits(mask: torch.Tensor) -> torch.Tensor | None:
    """For a bool mask [B, 1, T, L] whose rows are each "keys 0..n-1" (n >= 1): n as [B, T]; else None."""
    limits = mask[:, 0].sum(-1)  # [B, T]
    keys = torch.arange(mask.shape[-1])
    if not bool((mask[:, 0] == (keys < limits[..., None])).all()) or not bool((limits > 0).all()):
        return None
    return limits


class LimitsMemo:
    """The limits of the last mask seen: every layer of one forward passes the same mask object, so it is
    checked once per forward. One memo per installed backend (its text attention modules share it)."""

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, mask: torch.Tensor) -> torch.Tensor | None:
        if self._last is None or self._last[0] is not mask:
            self._last = (mask, prefix_limits(mask))
        return self._last[1]


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool, memo: LimitsMemo | None = None) -> torch.Tensor | None:
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
        limits = memo(mask) if memo is not None else prefix_limits(mask)
        if limits is None:
            return None
    elif is_causal:  # SDPA's causal mask is top-left aligned: query t sees keys 0..t
        limits = torch.arange(1, t + 1).clamp(max=length).expand(b, t)
    return _run(q, k, v, None, limits)
