"""The Llama decoder of Idefics3: RMSNorm (in fp32), half-split RoPE, grouped-query attention, SwiGLU.

One forward serves every use: a plain full pass (training, scoring, parity) with a causal mask and an
optional 2-D padding mask, and cached passes (prefill and decode) against a `KVCache` whose slots hold
sequences of different lengths, each token attending to its own slot's positions up to its own.
Everything one call shares across layers (positions, mask, RoPE tables, cache and slots) is built once in
`TextModel.forward` as a `TextCall` and handed to every layer. Attention goes through
`scaled_dot_product_attention`; the mask is dropped whenever it would allow everything, so SDPA can use
its causal or unmasked fast kernels.

Layers take the `TextConfig` they are built from. Parameter names equal the checkpoint keys under
`model.text_model.`. Kernels (idefics3/kernels) may replace `Attention` modules by subclasses that override
`attend` only, through `model/replace.py`; this file does not know them (ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .kv_cache import KVCache
from .rope import RotaryTable, apply_rope


@dataclass
class TextCall:
    """What one forward of the decoder shares across its layers."""

    positions: torch.Tensor      # [B, T] position of every token (in its cache slot, when cached)
    cos: torch.Tensor            # [B, T, hd] RoPE tables for those positions
    sin: torch.Tensor            # [B, T, hd]
    mask: torch.Tensor | None    # bool [B, 1, T, L] (True = may attend), or None
    is_causal: bool              # with mask None: SDPA's causal mask (else no mask at all)
    kv_len: int                  # L: keys per row (1 + the largest position when cached, else T)
    cache: KVCache | None = None
    slots: torch.Tensor | None = None  # [B] cache rows; None = rows 0..B-1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=bias)

    def forward(self, x: torch.Tensor, call: TextCall, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        q, k = apply_rope(q, call.cos, call.sin), apply_rope(k, call.cos, call.sin)
        if call.cache is not None:
            k, v = call.cache.update(layer, call.slots, call.positions, k, v, call.kv_len)  # [B, Hkv, L, hd]
        return self.o_proj(self.attend(q, k, v, call.mask, call.is_causal))  # [B, T, D]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        """Attention of q [B, H, T, hd] over k, v [B, Hkv, L, hd] -> [B, T, H * hd]."""
        b, _, t, _ = q.shape
        # GQA inside SDPA: each kv head serves H/Hkv query heads without copying the cache.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.num_kv_heads != self.num_heads)  # [B, H, T, hd]
        return y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, H * hd]


class MLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, call: TextCall, layer: int) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), call, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


def build_mask(positions: torch.Tensor, attention_mask: torch.Tensor | None, cached: bool,
               kv_len: int) -> tuple[torch.Tensor | None, bool]:
    """The attention mask for one forward, as (bool mask [B, 1, T, L] or None, is_causal).

    Cached: query (b, t) sees slot positions 0..positions[b, t]; one token of one row sees the whole
    kv_len (by the contract kv_len = its position + 1), so it needs no mask, and rows that all hold positions
    0..T-1 with kv_len = T (a prefill from the start) need only `is_causal` (aten's causal kernel skips the
    blocks above the diagonal: 1.5x faster than the same mask given explicitly, for 881 tokens on CPU). Plain:
    causal over the T tokens, with padded keys (attention_mask == 0) hidden; a fully padded query row sees
    itself so it stays finite. Built with tensor ops only: no host synchronisation on the decode path.
    """
    b, t = positions.shape
    if cached:
        if b == 1 and t == 1:
            return None, False
        if kv_len == t and bool((positions == torch.arange(t, device=positions.device)).all()):
            return None, True  # a prefill from position 0: the causal mask, and SDPA's causal path is faster
        keys = torch.arange(kv_len, device=positions.device)
        return (keys[None, None, None, :] <= positions[:, None, :, None]), False  # [B, 1, T, L]
    if attention_mask is None or bool(attention_mask.all()):
        return None, True
    causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()  # [T, T]
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, T]
    return mask | torch.eye(t, dtype=torch.bool, device=positions.device), False


class TextModel(nn.Module):
    """Token embeddings in, final hidden states out: embeds [B, T, D] -> [B, T, D]."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryTable(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """kv_len: 1 + the largest position in this call, when the caller knows it (saves a host sync)."""
        h = inputs_embeds
        call = self.plan(h, position_ids, attention_mask, cache, slots, kv_len)
        for i, layer in enumerate(self.layers):
            h = layer(h, call, i)
        return self.norm(h)

    def plan(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None,
             attention_mask: torch.Tensor | None, cache: KVCache | None, slots: torch.Tensor | None,
             kv_len: int | None) -> TextCall:
        """The `TextCall` every layer of this forward shares (positions, mask, RoPE tables, cache)."""
        b, t, _ = inputs_embeds.shape
        if position_ids is None:
            if cache is not None:
                raise ValueError("a cached forward needs position_ids (the position of every token in its slot)")
            position_ids = torch.arange(t, device=inputs_embeds.device).expand(b, t)  # [B, T]
            kv_len = t
        if kv_len is None:
            kv_len = int(position_ids.max()) + 1
        if cache is not None and kv_len > cache.max_seq_len:
            raise ValueError(f"position {kv_len - 1} does not fit the KV cache ({cache.max_seq_len} positions)")
        mask, is_causal = build_mask(position_ids, attention_mask, cache is not None, kv_len)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype, kv_len)  # [B, T, hd] each
        return TextCall(position_ids, cos, sin, mask, is_causal, kv_len, cache, slots)
