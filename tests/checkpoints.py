"""Tiny random Idefics3 checkpoints, written by transformers at test time.

Tests never download weights: each builds the smallest configuration that still exercises a feature,
lets transformers==5.24.0 initialise and `save_pretrained` it (the 5.x layout), and optionally rewrites
it into the 4.x layout of the real Hub repositories (rope_theta/rope_scaling, torch_dtype, sharded
safetensors with an index). The processor files come from the real SmolVLM tokenizer vendored in
tests/data/smolvlm-tokenizer, retargeted to the tiny tile size.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

# Vendored in the repository (tests/data/smolvlm-tokenizer, see its README): a bare clone has everything.
TEST_DATA = Path(__file__).resolve().parent / "data"
SMOLVLM_TOKENIZER = TEST_DATA / "smolvlm-tokenizer"

# The spec's tiny test model (§12), with the SmolVLM vocabulary so that the real tokenizer fits.
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=48)
TINY_TEXT = dict(vocab_size=49280, hidden_size=64, intermediate_size=56, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                 pad_token_id=2, bos_token_id=1, eos_token_id=49279, max_position_embeddings=4096)
SMOLVLM_IMAGE_TOKEN = 49190


def tiny_config(vision: dict | None = None, text: dict | None = None, **top: Any) -> dict:
    """A config dict for transformers' Idefics3Config, the tiny defaults overridden by the arguments."""
    cfg = dict(vision_config={**TINY_VISION, **(vision or {})}, text_config={**TINY_TEXT, **(text or {})},
               scale_factor=2, image_token_id=SMOLVLM_IMAGE_TOKEN, tie_word_embeddings=False)
    cfg.update(top)
    return cfg


def build_hf_model(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """transformers' Idefics3ForConditionalGeneration with seeded random weights (eager attention, eval)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Idefics3Config(**copy.deepcopy(cfg))
    config._attn_implementation = "eager"
    model = Idefics3ForConditionalGeneration(config).to(dtype).eval()
    # Random init leaves small weights; widen a few so that logits are not all ~0 and ties are rare.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(0.0, 0.02)
    return model


def write_processor_files(folder: Path, tile: int, longest_edge: int, image_seq_len: int) -> None:
    """Copy the real SmolVLM tokenizer files and point the image settings at a tiny tile size."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        shutil.copy(SMOLVLM_TOKENIZER / name, folder / name)
    pre = json.loads((SMOLVLM_TOKENIZER / "preprocessor_config.json").read_text())
    pre["max_image_size"] = {"longest_edge": tile}
    pre["size"] = {"longest_edge": longest_edge}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (folder / "processor_config.json").write_text(
        json.dumps({"image_seq_len": image_seq_len, "processor_class": "Idefics3Processor"}, indent=2))


def save_checkpoint(model, folder: Path, layout: str = "5.x", shard_size: str = "200KB",
                    processor: bool = True) -> Path:
    """Save a transformers model as a checkpoint folder, in the 5.x layout or the 4.x Hub layout."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "5.x":
        model.save_pretrained(folder)
    elif layout == "4.x":
        model.save_pretrained(folder, max_shard_size=shard_size)
        to_4x_config(folder / "config.json")
    else:
        raise ValueError(layout)
    gen = {"bos_token_id": 1, "eos_token_id": [49279], "pad_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if processor:
        vc = model.config.vision_config
        tile = vc.image_size
        seq = (tile // vc.patch_size) ** 2 // model.config.scale_factor ** 2
        write_processor_files(folder, tile=tile, longest_edge=2 * tile, image_seq_len=seq)
    return folder


def to_4x_config(path: Path) -> None:
    """Rewrite a 5.x config.json into the 4.x layout of the Hub repositories."""
    cfg = json.loads(path.read_text())
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    for key in list(cfg):
        if key.startswith("_"):
            cfg[key[1:]] = cfg.pop(key)
    text = cfg["text_config"]
    rope = text.pop("rope_parameters", None) or {}
    text["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        text["rope_scaling"] = rope
    else:
        text["rope_scaling"] = None
    cfg["vision_config"]["model_type"] = "idefics3"
    cfg["transformers_version"] = "4.46.0"
    path.write_text(json.dumps(cfg, indent=2))
