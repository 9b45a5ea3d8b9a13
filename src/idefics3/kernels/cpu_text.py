"""The text decoder's prefill attention on CPU through our kernel (cpu_attention.py), from outside the model.

Prefill attention is where aten's CPU flash attention is slowest relative to the matrix multiplies around it:
causal with grouped kv heads, and, after a cached prefix (a multi-turn chat, an encoder-cache hit), through an
explicit mask. `fuse_text_kernels(model)` turns each decoder `Attention` into a `FusedTextAttention` (a subclass:
same object, parameters and names) whose `attend` hands calls of at least MIN_QUERIES query tokens to
`text_attention` and keeps SDPA for the rest (decode steps are one token, and on CPU the fused decode kernel
takes them anyway) and wherever the kernel declines. Inference only: with autograd recording it declines.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.text import Attention
from .build import swap_classes
from .cpu_attention import text_attention

MIN_QUERIES = 16


class FusedTextAttention(Attention):
    """Attention whose attention itself is the C++ kernel for prefill-sized calls (see the module docstring)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        b, h, t, hd = q.shape
        if t >= MIN_QUERIES:
            y = text_attention(q, k, v, mask, is_causal)  # [B, T, H, hd] or None
            if y is not None:
                return y.view(b, t, h * hd)  # [B, T, H * hd]
        return super().attend(q, k, v, mask, is_causal)


def fuse_text_kernels(model: nn.Module) -> int:
    """Give the decoder attention of `model` the kernel (in place, idempotent); returns how many modules
    changed. Nothing happens with IDEFICS3_KERNELS=0."""
    return swap_classes(model, {Attention: FusedTextAttention})
