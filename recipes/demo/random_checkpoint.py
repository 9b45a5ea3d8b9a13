"""A tiny Idefics3 checkpoint with random weights, for trying the whole pipeline on a fresh machine.

It is the real architecture at toy size (64-px tiles, 16 image tokens each, a 4-layer decoder) with a
tokenizer trained on a few sentences, so every piece runs: image splitting, prompt expansion, the
encoder, the connector, cached generation and decoding. Its answers are random text: it has never
been trained. Usage: python -m recipes.demo.random_checkpoint OUT_FOLDER [--seed S]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from idefics3.config import Idefics3Config
from idefics3.model.idefics3 import Idefics3ForConditionalGeneration

from .tokenizer import train_tokenizer, write_image_processor_files

CORPUS = [
    "User: What is in this image? Assistant: A red circle and a blue square on a white background.",
    "User: How many shapes are there? Assistant: There are three shapes.",
    "User: Describe the picture. Assistant: The picture shows a small green triangle at the top left.",
    "User: Which colour is the large shape? Assistant: The large shape is yellow.",
    "Hello! I am a tiny model with random weights, so my answers are not meaningful yet.",
]


def make_random_checkpoint(folder: str | Path, seed: int = 0, tile: int = 64) -> Path:
    """Write config, random safetensors, tokenizer and processor files into `folder`."""
    folder = Path(folder)
    ids = train_tokenizer(CORPUS * 4, vocab_size=600, folder=folder)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    raw = {"model_type": "idefics3", "scale_factor": 2, "image_token_id": ids["<image>"],
           "tie_word_embeddings": False, "pad_token_id": ids["<|im_end|>"], "torch_dtype": "float32",
           "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "image_size": tile, "patch_size": 8},
           "text_config": {"vocab_size": vocab, "hidden_size": 128, "intermediate_size": 256,
                           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                           "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<end_of_utterance>"],
                           "pad_token_id": ids["<|im_end|>"]}}
    config = Idefics3Config.from_dict(raw)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.save_pretrained(folder)
    gen = {"bos_token_id": ids["<|im_start|>"], "eos_token_id": [ids["<end_of_utterance>"]],
           "pad_token_id": ids["<|im_end|>"]}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_image_processor_files(folder, tile=tile, longest_edge=2 * tile, image_seq_len=config.image_seq_len)
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
