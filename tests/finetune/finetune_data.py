"""Data the fine-tuning tests make: a small synthetic colour task, JSONL and parquet writers.

The task: each image is a noisy patch of red, green or blue; the user asks for its colour and the assistant
answers "It is <colour>." A tiny model learns it in a few steps, which makes loss curves testable on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def colour_image(name: str, rng: np.random.Generator, size: tuple[int, int] = (40, 48)) -> Image.Image:
    base = np.array(COLOURS[name])[None, None, :]
    pixels = np.clip(base + rng.integers(-20, 20, (*size, 3)), 0, 255).astype("uint8")
    return Image.fromarray(pixels)


def colour_row(image: str, name: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_colour_task(folder: Path, n: int, seed: int = 0, name: str = "train.jsonl") -> Path:
    """n rows of the colour task; images in folder/images/, referenced relative to the JSONL file."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        colour_image(colour, rng).save(folder / "images" / f"{name}-{i}.png")
        rows.append(colour_row(f"images/{name}-{i}.png", colour))
    return write_jsonl(folder / name, rows)
