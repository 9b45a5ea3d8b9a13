"""The SigLIP vision encoder of Idefics3, with NaViT-style position ids for partially valid frames.

A frame of H×W pixels becomes (H/p)·(W/p) patch embeddings (a strided convolution), plus learned
position embeddings. Frames that were padded to the batch's largest size carry a patch-validity
mask: the valid patches of each frame get position ids bucketised onto the full N_side×N_side grid
(so a half-height image uses every row of the table, spaced twice as far), padded patches get id 0,
and attention ignores padded keys. When every patch is valid the mask is skipped entirely, which also
lets SDPA take its fastest kernel. All layers run, then `post_layernorm`; there is no pooling head.

Layers take the `VisionConfig` they are built from; parameter names equal the checkpoint keys under
`model.vision_model.`. Kernels (idefics3/kernels) may replace the layers by subclasses through
`model/replace.py`; this file does not know them (ARCHITECTURE.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


def patch_mask_from_pixels(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, H, W] pixel validity -> [N, H/p, W/p] patch validity (a patch is valid if any pixel is)."""
    n, h, w = pixel_mask.shape
    hp, wp = h // patch_size, w // patch_size
    m = pixel_mask[:, : hp * patch_size, : wp * patch_size]  # patches that do not fit are never used
    m = m.reshape(n, hp, patch_size, wp, patch_size)  # [N, hp, p, wp, p]
    return m.sum(dim=(2, 4)) > 0


def bucketized_position_ids(patch_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """[N, hp, wp] bool -> [N, hp*wp] long position ids on the patches_per_side² grid (0 where padded).

    Fractional row/column coordinates k * (1/n_valid) are computed in float32, clamped below 1 and
    bucketised against boundaries arange(1/N, 1, 1/N); for a fully valid frame this is arange(N²).
    """
    n, hp, wp = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side, device=device)
    n_rows = patch_mask[:, :, 0].sum(dim=1)  # [N]
    n_cols = patch_mask[:, 0, :].sum(dim=1)  # [N]
    rows = torch.arange(hp, device=device, dtype=torch.float32)[None, :] * (1.0 / n_rows)[:, None]  # [N, hp]
    cols = torch.arange(wp, device=device, dtype=torch.float32)[None, :] * (1.0 / n_cols)[:, None]  # [N, wp]
    rows = torch.bucketize(rows.clamp(max=1.0 - 1e-6), boundaries, right=True)
    cols = torch.bucketize(cols.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (rows[:, :, None] * patches_per_side + cols[:, None, :]).reshape(n, hp * wp)  # [N, hp*wp]
    return torch.where(patch_mask.reshape(n, hp * wp), ids, torch.zeros_like(ids))


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        p, d = config.patch_size, config.hidden_size
        self.patch_size = p
        self.patches_per_side = config.patches_per_side
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding(self.patches_per_side ** 2, d)
        self._identity: bool | None = None

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # [N, D, hp, wp]
        n, _, hp, wp = x.shape
        x = x.flatten(2).transpose(1, 2)  # [N, hp*wp, D], row-major patches
        if patch_mask is None:
            if hp == wp == self.patches_per_side and self._full_grid_is_arange():
                return x + self.position_embedding.weight  # [N, S, D]: full frames use ids arange(N_side²)
            patch_mask = torch.ones(n, hp, wp, dtype=torch.bool, device=x.device)
        return x + self.position_embedding(bucketized_position_ids(patch_mask, self.patches_per_side))

    def _full_grid_is_arange(self) -> bool:
        """Whether float32 bucketising maps a full grid onto arange (true for 26, 27, 32; checked once)."""
        if self._identity is None:
            side = self.patches_per_side
            ids = bucketized_position_ids(torch.ones(1, side, side, dtype=torch.bool), side)
            self._identity = bool((ids[0] == torch.arange(side * side)).all())
        return self._identity


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden_size // self.num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        y = self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), key_mask)  # [N, S, D]
        return self.out_proj(y)  # [N, S, D]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) v per head, over the valid keys: [N, S, D] projections -> [N, S, D]."""
        n, s, d = q.shape
        q, k, v = (t.view(n, s, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [N, H, S, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [N, H, S, hd]
        return y.transpose(1, 2).reshape(n, s, d)  # [N, S, D]


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class VisionTransformer(nn.Module):
    """Frames [N, C, H, W] (+ optional pixel mask [N, H, W]) -> patch features [N, hp*wp, D]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        patch_mask = None
        if pixel_mask is not None:
            patch_mask = patch_mask_from_pixels(pixel_mask, self.patch_size)  # [N, hp, wp]
            if bool(patch_mask.all()):
                patch_mask = None  # every patch valid: no mask, the fast attention path
        x = self.embeddings(pixel_values, patch_mask)  # [N, S, D]
        key_mask = None if patch_mask is None else patch_mask.reshape(x.shape[0], 1, 1, -1)  # [N, 1, 1, S]
        return self.post_layernorm(self.encoder(x, key_mask))
