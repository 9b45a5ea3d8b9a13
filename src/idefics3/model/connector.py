"""The Idefics3 connector: pixel shuffle, then a bias-free linear projection into the text width.

Pixel shuffle trades sequence length for width: each r×r block of neighbouring patches becomes one
token of r²·D features, so a 26×26 grid at r=2 becomes 169 tokens. The channel order matters for the
pretrained projection: index q = dh·(D·r) + dw·D + e holds patch (row p·r+dh, col b·r+dw), feature e.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Idefics3Config


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """[N, S, D] on a square √S×√S grid -> [N, S/r², D·r²] in the checkpoint's channel order."""
    n, s, d = x.shape
    side = math.isqrt(s)
    if side * side != s or side % r:
        raise ValueError(f"pixel_shuffle needs a square patch grid divisible by {r}, got {s} patches")
    x = x.view(n, side, side // r, d * r)  # [N, h, w/r, D·r]: column offset dw joins the features
    x = x.permute(0, 2, 1, 3)  # [N, w/r, h, D·r]
    x = x.reshape(n, side // r, side // r, d * r * r)  # [N, w/r, h/r, D·r²]: row offset dh is major
    x = x.permute(0, 2, 1, 3)  # [N, h/r, w/r, D·r²]
    return x.reshape(n, s // (r * r), d * r * r)  # [N, S/r², D·r²], row-major blocks


class ModalityProjection(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Connector(nn.Module):
    """Patch features [N, S, D_vision] -> image token embeddings [N, S/r², D_text]."""

    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = ModalityProjection(config.connector_input_size, config.text_config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(pixel_shuffle(x, self.scale_factor))
