"""Choosing between our attention kernel and PyTorch's SDPA by timing both, on this machine, at load.

Which is faster depends on the CPU, not only on its flags: on an AMD EPYC with AVX512-BF16 and no AMX our C++
flash attention beats aten's, while on an Intel Xeon with AMX aten's SDPA (oneDNN brgemm on the tile unit) ran
a 1024-patch SigLIP frame in 6.9 ms per layer against our kernel's 22.5 ms, and a 900-token causal prefill in
4.6 ms against 7.3 ms. So the backend times both on the model's own shapes (one frame of patches; a 512-token
causal prefill with the model's grouped heads) and keeps the faster, with the timings as the stated reason. A
measurement costs a few hundred milliseconds once per process and shape (they are remembered);
IDEFICS3_CALIBRATE=0 skips it and takes the kernel wherever it can run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_attention

ENV_CALIBRATE = "IDEFICS3_CALIBRATE"
_REMEMBERED: dict[tuple, Verdict] = {}


@dataclass(frozen=True)
class Verdict:
    ours: bool            # take our kernel
    reason: str           # the timings, for Backend.describe()


def calibrating() -> bool:
    return os.environ.get(ENV_CALIBRATE, "1") != "0"


def seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The best of `repeats` timed calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _compare(key: tuple, ours: Callable[[], object], sdpa: Callable[[], object], what: str) -> Verdict:
    if key in _REMEMBERED:
        return _REMEMBERED[key]
    with torch.inference_mode():
        if ours() is None:  # the kernel declined these inputs
            verdict = Verdict(False, f"our kernel declines {what}")
        else:
            t_ours, t_sdpa = seconds(ours), seconds(sdpa)
            faster = "ours" if t_ours <= t_sdpa else "SDPA"
            verdict = Verdict(t_ours <= t_sdpa, f"measured on {what}: ours {t_ours * 1e3:.2f} ms, SDPA "
                                                f"{t_sdpa * 1e3:.2f} ms, {faster} faster")
    _REMEMBERED[key] = verdict
    return verdict


def vision_attention(heads: int, patches: int, head_dim: int, dtype: torch.dtype) -> Verdict:
    """Our kernel or SDPA for the encoder's bidirectional attention over one frame."""
    if not calibrating():
        return Verdict(True, f"{ENV_CALIBRATE}=0: not measured")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, patches, head_dim, generator=gen).to(dtype) for _ in range(3))
    key = ("vision", heads, patches, head_dim, dtype, torch.get_num_threads())
    return _compare(key, lambda: cpu_attention.attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v),
                    f"one frame ({patches} patches)")


def prefill_attention(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, tokens: int = 512) -> Verdict:
    """Our kernel or SDPA for the decoder's causal prefill attention (grouped heads)."""
    if not calibrating():
        return Verdict(True, f"{ENV_CALIBRATE}=0: not measured")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(dtype) for _ in range(2))
    key = ("prefill", heads, kv_heads, head_dim, tokens, dtype, torch.get_num_threads())
    return _compare(key, lambda: cpu_attention.text_attention(q, k, v, None, True),
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads),
                    f"a {tokens}-token causal prefill")
