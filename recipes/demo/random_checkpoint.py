"""Random-weight Idefics3 checkpoints: the demo recipe's starting point, and an untrained toy for trying things.

`write_checkpoint` writes one: a byte-level BPE trained on given texts (tokenizer.py), the configuration with
seeded random weights (and, when asked, the layer-0 head of marker_head.py), the generation and processor files.
The recipe's `init_checkpoint` calls it with the demo model's configuration; `make_random_checkpoint`, this
module's command, with a toy one: the real architecture at toy size (64-px tiles, 16 image tokens each, a
4-layer decoder) and a tokenizer trained on a few sentences, so every piece runs (image splitting, prompt
expansion, the encoder, the connector, cached generation and decoding). Its answers are random text.

    python -m recipes.demo.random_checkpoint OUT_FOLDER [--seed S]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from idefics3 import Idefics3Config, Idefics3ForConditionalGeneration

from .marker_head import install_marker_head
from .tokenizer import train_tokenizer, write_image_processor_files

CORPUS = [
    "User: What is in this image? Assistant: A red circle and a blue square on a white background.",
    "User: How many shapes are there? Assistant: There are three shapes.",
    "User: Describe the picture. Assistant: The picture shows a small green triangle at the top left.",
    "User: Which colour is the large shape? Assistant: The large shape is yellow.",
    "Hello! I am a tiny model with random weights, so my answers are not meaningful yet.",
]
TOY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "patch_size": 8}
TOY_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048}


def write_checkpoint(folder: str | Path, texts: Iterable[str], *, vocab_size: int, vision: dict[str, Any],
                     text: dict[str, Any], longest_edge: int, seed: int = 0, marker_head: bool = False,
                     generation: dict[str, Any] | None = None) -> Path:
    """Write a tokenizer trained on `texts` (at most `vocab_size` tokens), config.json and seeded random
    model.safetensors (`vision` and `text` are the sub-configurations without the token ids, which come from the
    tokenizer; the tile is vision's image_size), generation_config.json (plus `generation`) and the processor
    files (images resized to `longest_edge`) into `folder`; with `marker_head`, layer 0 gets the marker-copying
    head of marker_head.py."""
    folder = Path(folder)
    ids = train_tokenizer(texts, vocab_size=vocab_size, folder=folder)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    bos, eos, pad = ids["<|im_start|>"], ids["<end_of_utterance>"], ids["<|im_end|>"]
    raw = {"model_type": "idefics3", "scale_factor": 2, "image_token_id": ids["<image>"],
           "tie_word_embeddings": False, "pad_token_id": pad, "torch_dtype": "float32",
           "vision_config": dict(vision),
           "text_config": {**text, "vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}}
    config = Idefics3Config.from_dict(raw)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    if marker_head:
        install_marker_head(model, ids)
    model.save_pretrained(folder)
    gen = {"bos_token_id": bos, "eos_token_id": [eos], "pad_token_id": pad, **(generation or {})}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_image_processor_files(folder, tile=vision["image_size"], longest_edge=longest_edge,
                                image_seq_len=config.image_seq_len)
    return folder


def make_random_checkpoint(folder: str | Path, seed: int = 0, tile: int = 64) -> Path:
    """The toy checkpoint (see the module docstring) in `folder`, with an example picture (example.png)."""
    folder = write_checkpoint(folder, CORPUS * 4, vocab_size=600, vision={**TOY_VISION, "image_size": tile},
                              text=TOY_TEXT, longest_edge=2 * tile, seed=seed)
    example_image().save(folder / "example.png")
    return folder


def example_image():
    """A 160x120 picture of a few coloured shapes (larger than one tile, so it is split)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 120), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 10, 60, 60), fill="red")
    draw.rectangle((90, 20, 140, 70), fill="blue")
    draw.polygon([(40, 110), (70, 70), (100, 110)], fill="green")
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_random_checkpoint(args.folder, args.seed))


if __name__ == "__main__":
    main()
