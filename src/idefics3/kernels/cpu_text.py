"""The text decoder's prefill attention on CPU through our kernel (cpu_attention.py), from outside the model.

Prefill attention is where aten's CPU flash attention is slowest relative to the matrix multiplies around it:
causal with grouped kv heads, and, after a cached prefix (a multi-turn chat, an encoder-cache hit), through an
explicit mask. The backend (backend.py) replaces each decoder `Attention` by a `FusedTextAttention` view
(model/replace.py: a subclass over the same parameters and names) whose `attend` hands calls of at least
MIN_QUERIES query tokens to `text_attention` and keeps SDPA for the rest (decode steps are one token, and on
CPU the fused decode kernel takes them anyway) and wherever the kernel declines. Inference only: with
autograd recording it declines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..model.replace import view_as
from ..model.text import Attention
from .cpu_attention import LimitsMemo, text_attention

MIN_QUERIES = 16


class FusedTextAttention(Attention):
    """Attention whose attention itself is the C++ kernel for prefill-sized calls (see the module docstring)."""

    memo: LimitsMemo  # shared by the backend's text attention modules: one mask check per forward

    @classmethod
    def of(cls, module: Attention, memo: LimitsMemo) -> FusedTextAttention:
        view = view_as(module, cls)
        view.memo = memo
        return view

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        b, h, t, hd = q.shape
        if t >= MIN_QUERIES:
            y = text_attention(q, k, v, mask, is_causal, self.memo)  # [B, T, H, hd] or None
            if y is not None:
                return y.view(b, t, h * hd)  # [B, T, H * hd]
        return super().attend(q, k, v, mask, is_causal)


def text_replacement(memo: LimitsMemo) -> Callable[[str, nn.Module], nn.Module | None]:
    """The `replace_modules` choice that gives every decoder `Attention` (exact class) the kernel."""
    return lambda name, module: FusedTextAttention.of(module, memo) if type(module) is Attention else None
