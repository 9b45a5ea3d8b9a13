"""Write a trained demo checkpoint with a wider text residual stream that computes exactly the same function.

transformers' LlamaConfig refuses a `hidden_size` that is not a multiple of `num_attention_heads`, even when
`head_dim` is given (5.x `validate_architecture`). The demo's text model is 128 wide with 6 heads of 32, so the
recipe trains at 128 and `widen` writes the installed folder at the next multiple (132), which transformers
loads:
- every weight that reads the residual stream (embeddings' columns, q/k/v, gate/up, lm_head) gets zero
  columns for the new dimensions, and every weight that writes it (o_proj, down_proj, the connector) zero rows,
  so the new dimensions hold 0 everywhere and nothing reads them;
- RMSNorm divides by the mean square over the whole width: with W' = W + n zeros it is W/W' of the old one,
  so `rms_norm_eps` becomes eps·W/W' and every norm weight is multiplied by sqrt(W/W'):
  w'·x / sqrt((W/W')(m + eps)) = w·x / sqrt(m + eps), the old output exactly (up to float rounding).
The test (tests/recipes/demo/test_widen.py) compares the logits of the two folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

READS = ("embed_tokens.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
         "up_proj.weight", "lm_head.weight")  # [*, W]: the residual stream is their input
WRITES = ("o_proj.weight", "down_proj.weight", "modality_projection.proj.weight")  # [W, *]: their output
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "text_model.norm.weight")  # [W]


def widened_size(hidden: int, heads: int) -> int:
    """The smallest multiple of `heads` that is at least `hidden`."""
    return -(-hidden // heads) * heads


@torch.no_grad()
def widen(folder: str | Path) -> int:
    """Rewrite config.json and model.safetensors in `folder` at the next multiple of the head count (no-op when
    the width already is one); returns the new width."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    old = text["hidden_size"]
    new = widened_size(old, text["num_attention_heads"])
    if new == old:
        return old
    if text.get("head_dim") is None:
        raise ValueError("widening keeps head_dim: the config must give it")
    pad, scale = new - old, math.sqrt(old / new)
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if "vision_model" in name:
            out[name] = t
        elif name.endswith(READS):
            out[name] = torch.nn.functional.pad(t, (0, pad))  # [*, W'] zero columns
        elif name.endswith(WRITES):
            out[name] = torch.nn.functional.pad(t, (0, 0, 0, pad))  # [W', *] zero rows
        elif name.endswith(NORMS):
            out[name] = torch.nn.functional.pad(t * scale, (0, pad))  # [W']
        else:
            raise ValueError(f"widen: no rule for {name} {tuple(t.shape)}")
        out[name] = out[name].contiguous()
    text["hidden_size"] = new
    text["rms_norm_eps"] = text["rms_norm_eps"] * old / new
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return new
