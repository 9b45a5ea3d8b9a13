"""Processor speed: ours against transformers' Idefics3Processor (PIL and, if importable, torchvision backends).

Two workloads, run alternately (ours, then each reference, repeated) so that machine noise hits all sides alike:
  photo  one 4000x3000 photo-like image with a one-image prompt
  batch  8 prompts with one image each (sizes from 300x400 to 1920x1080), padded
Outputs are checked to be identical to the PIL reference before timing. Prints per-workload medians and the
ratio reference/ours (> 1 means we are faster), after the CPU and its ISA.

    python bench/processor.py [--folder PATH] [--reps 7] [--size N] [--threads N]

--folder defaults to the SmolVLM processor files vendored in tests/data/smolvlm-tokenizer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from idefics3 import Idefics3Processor  # noqa: E402
from idefics3.device import cpu_description  # noqa: E402

DEFAULT_FOLDER = ROOT / "tests" / "data" / "smolvlm-tokenizer"  # vendored in the repository


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    base = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    base += rng.normal(0, 8, base.shape).astype(np.float32)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.2, width * 0.45, height * 0.7), fill=(200, 60, 40))
    draw.rectangle((width * 0.55, height * 0.5, width * 0.9, height * 0.95), fill=(30, 120, 220))
    return image


def workloads() -> dict[str, tuple[list[str], list[Image.Image]]]:
    sizes = [(640, 480), (1024, 768), (1920, 1080), (300, 400), (800, 800), (1280, 720), (500, 1500), (2000, 1500)]
    batch_images = [photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    batch_text = [f"<image>Question {i}: what is shown here?" for i in range(len(sizes))]
    return {"photo 4000x3000": (["<image>Describe this photo."], [photo(4000, 3000, seed=99)]),
            "batch of 8": (batch_text, batch_images)}


def reference_processors(folder: Path, overrides: dict) -> dict:
    from transformers import Idefics3Processor as Reference
    from transformers.utils import logging

    logging.set_verbosity_error()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["transformers-pil"] = Reference.from_pretrained(str(folder), backend="pil", **overrides)
        try:
            import torchvision  # noqa: F401

            out["transformers-torchvision"] = Reference.from_pretrained(str(folder), backend="torchvision",
                                                                        **overrides)
        except ImportError:
            print("torchvision is not importable here: comparing against the PIL backend only")
    return out


def check_identical(ours: dict, expected: dict) -> None:
    assert list(ours) == list(expected), (list(ours), list(expected))
    for key in expected:
        if expected[key].is_floating_point():
            assert (ours[key] - expected[key]).abs().max().item() <= 1e-6, key
        else:
            assert torch.equal(ours[key], expected[key]), key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--size", type=int, default=None, help="longest_edge override (e.g. 1456)")
    parser.add_argument("--threads", type=int, default=None, help="our image threads (default: usable cores, <= 8)")
    args = parser.parse_args()
    overrides = {"size": {"longest_edge": args.size}} if args.size else {}
    ours = Idefics3Processor.from_pretrained(args.folder, num_threads=args.threads, **overrides)
    references = reference_processors(args.folder, overrides)
    print(f"folder {args.folder}  size {ours.size}  tile {ours.max_image_size}  reps {args.reps}  "
          f"our threads {args.threads or 'default'}")
    print(f"cpu: {cpu_description()}, torch {torch.__version__}")
    for name, (texts, images) in workloads().items():
        def run(processor, texts=texts, images=images):
            return processor(text=texts, images=images, padding=True, return_tensors="pt")

        check_identical(run(ours), run(references["transformers-pil"]))
        times: dict[str, list[float]] = {"ours": [], **{k: [] for k in references}}
        for _ in range(args.reps):
            for label, processor in [("ours", ours), *references.items()]:
                start = time.perf_counter()
                run(processor)
                times[label].append(time.perf_counter() - start)
        medians = {label: statistics.median(values) for label, values in times.items()}
        shape = tuple(run(ours)["pixel_values"].shape)
        print(f"\n{name}: pixel_values {shape}")
        for label, median in medians.items():
            ratio = "" if label == "ours" else f"   ratio {label}/ours = {median / medians['ours']:.2f}x"
            print(f"  {label:26s} median {median * 1000:8.1f} ms{ratio}")


if __name__ == "__main__":
    main()
