"""The demo model's one structured initial head: layer 0 copies each image token's `<row_r_col_c>` marker into it.

The demo's scenes put one object in each 32-px tile, so an image token's cell is known only from the marker
just before it: `<fake_token_around_image><row_r_col_c><image>`. Every tile looks the same to the encoder
(its position embeddings are the same in every tile), so nothing in the image token itself says where it is,
and a model trained from random weights never learnt to look from an image token to its marker: left/right
stayed at chance (NOTES.md). This module writes that one missing piece into the random initialisation; training
then changes every weight as usual. The recipe starts from it (`--no-marker-head` to leave it out): the head
survives training, the image tokens know their cells, and the position stages then teach left/right.

The construction, on a model with text width H (all other weights keep their random values):
- Reserved residual dimensions: H-1 is a constant (every token embedding, and every image token through a
  constant vision feature: post-layernorm weight 0 and bias 1 in the encoder's last feature, projected by the
  connector), H-2 marks the markers, and twelve before them hold a one-hot row (1..6) and column (1..6).
- Layer 0, query head 0 and its key/value head 0: the query is the constant, the key is the marker flag,
  so only markers are attended to; the query is the key rotated back by one position at seven RoPE
  frequencies, so the scores peak one token back (where an image token's own marker sits) and are at most
  0.55 of that at any offset from 4 to 600 (the next marker back is 4 tokens away). Values and the output
  projection copy the row and column dimensions, so after layer 0 each image token holds its own cell, in the
  markers' own dimensions.
- `readers` query heads (2 by default) read key/value head 0. The demo's text model has 6 query heads, each with
  its own key/value head, so key/value head 0 is copied into key/value head 1, and query head 1 too reads only
  the markers' cells (with its own random query and output). Under grouped-query attention the query heads that
  share key/value head 0 read it already; key/value heads are copied only where `readers` needs more.
`check` measures it: at init each image token puts more than 0.99 of query head 0's attention on its marker.
"""

from __future__ import annotations

import math

import torch

from idefics3 import Idefics3ForConditionalGeneration

GRID_MAX = 6  # the tokenizer's markers run <row_1_col_1> .. <row_6_col_6>
FREQUENCIES = (0, 1, 2, 3, 4, 7, 8)  # RoPE pairs: at any offset from 4 to 600, at most 0.55 of the peak at 1
AMPLITUDE = 15.0  # query x key size per pair: the own marker scores ~8 nats above any other
VALUE = 2.0  # size of the reserved dimensions in the embeddings, near that of a N(0, 1) embedding entry


def reserved_dims(hidden: int) -> dict[str, list[int]]:
    """The residual dimensions the head uses: const, marker flag, row one-hot, column one-hot."""
    base = hidden - 2 - 2 * GRID_MAX
    return {"const": [hidden - 1], "marker": [hidden - 2],
            "row": list(range(base, base + GRID_MAX)), "col": list(range(base + GRID_MAX, base + 2 * GRID_MAX))}


@torch.no_grad()
def install_marker_head(model: Idefics3ForConditionalGeneration, token_ids: dict[str, int], readers: int = 2) -> None:
    """Write the marker-copying head into a freshly initialised `model` (see the module docstring);
    `token_ids` maps `<row_r_col_c>` and `<global-img>` to their ids; at least `readers` query heads of layer 0
    read key/value head 0 (the markers' cells)."""
    text, vision = model.config.text_config, model.config.vision_config
    hidden, hd = text.hidden_size, text.head_dim
    if hidden < 4 * (2 * GRID_MAX + 2) or max(FREQUENCIES) >= hd // 2:
        raise ValueError(f"text width {hidden} / head size {hd} is too small for the marker head")
    dims = reserved_dims(hidden)
    const, marker, rows, cols = dims["const"][0], dims["marker"][0], dims["row"], dims["col"]
    reserved = [d for ds in dims.values() for d in ds]
    emb = model.model.text_model.embed_tokens.weight  # [V, H]
    emb[:, reserved] = 0.0
    emb[:, const] = VALUE
    emb[token_ids["<global-img>"], marker] = VALUE  # a marker with no cell: the global image holds no row/col
    for r in range(1, GRID_MAX + 1):
        for c in range(1, GRID_MAX + 1):
            t = token_ids[f"<row_{r}_col_{c}>"]
            emb[t, marker] = emb[t, rows[r - 1]] = emb[t, cols[c - 1]] = VALUE

    dv = vision.hidden_size
    post = model.model.vision_model.post_layernorm
    post.weight[dv - 1], post.bias[dv - 1] = 0.0, 1.0  # the encoder's last feature is 1 for every patch
    proj = model.model.connector.modality_projection.proj.weight  # [H, Dv·r²]
    const_in = [dv * k + dv - 1 for k in range(model.config.scale_factor ** 2)]  # that feature of each patch
    proj[:, const_in] = 0.0
    proj[reserved, :] = 0.0
    proj[const, const_in[0]] = VALUE

    attn = model.model.text_model.layers[0].self_attn
    inv_freq = 1.0 / (text.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))  # [hd/2]
    q, k = torch.zeros(hd), torch.zeros(hd)
    for i in FREQUENCIES:  # pair (i, i + hd/2) is one complex number: q = k·e^{-iθ} peaks at offset +1
        q[i], q[i + hd // 2], k[i] = math.cos(inv_freq[i]), -math.sin(inv_freq[i]), 1.0
    for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
        w[:hd] = 0.0  # query head 0 and key/value head 0 (which query head 0 reads)
    attn.q_proj.weight[:hd, const] = q * math.sqrt(AMPLITUDE)
    attn.k_proj.weight[:hd, marker] = k * math.sqrt(AMPLITUDE)
    attn.o_proj.weight[:, :hd] = 0.0
    attn.o_proj.weight[reserved, :] = 0.0
    for j, d in enumerate(rows + cols):
        attn.v_proj.weight[j, d] = 1.0
        attn.o_proj.weight[d, j] = 1.0
    group = text.num_attention_heads // text.num_key_value_heads  # query heads per key/value head
    for h in range(1, -(-readers // group)):  # more key/value heads that repeat head 0
        attn.k_proj.weight[h * hd:(h + 1) * hd] = attn.k_proj.weight[:hd]
        attn.v_proj.weight[h * hd:(h + 1) * hd] = attn.v_proj.weight[:hd]


@torch.no_grad()
def check(model: Idefics3ForConditionalGeneration, batch: dict[str, torch.Tensor]) -> float:
    """The least attention that query head 0 of layer 0 puts from an image token on the token before it."""
    from idefics3.model.rope import apply_rope

    layer = model.model.text_model.layers[0]
    captured: dict[str, tuple] = {}
    handle = layer.self_attn.register_forward_pre_hook(lambda mod, args: captured.setdefault("in", args))
    try:
        model(**batch)
    finally:
        handle.remove()
    x, call = captured["in"][:2]  # normed input [B, T, H] and the call's shared state (TextCall)
    cos, sin = call.cos, call.sin  # the RoPE tables [B, T, hd]
    attn, t = layer.self_attn, x.shape[1]
    hd = attn.head_dim
    q = apply_rope(attn.q_proj(x)[..., None, :hd].transpose(1, 2), cos, sin)  # [B, 1, T, hd]
    k = apply_rope(attn.k_proj(x)[..., None, :hd].transpose(1, 2), cos, sin)  # [B, 1, T, hd]
    scores = (q @ k.transpose(-1, -2))[:, 0] / math.sqrt(hd)  # [B, T, T]
    probs = (scores + torch.full((t, t), float("-inf")).triu(1)).softmax(-1)
    ids = batch["input_ids"]
    image = (ids == model.config.image_token_id) & (torch.roll(ids, 1, dims=1) != model.config.image_token_id)
    b, i = image.nonzero(as_tuple=True)  # the first image token of each tile, right after its marker
    return float(probs[b, i, i - 1].min())
