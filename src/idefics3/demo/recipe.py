"""The recipe of the packaged demo model: data, tokenizer, a random-init checkpoint, `idefics3 finetune --full`.

    python -m idefics3.demo.recipe WORK_FOLDER [--seed 0] [--count 40000] [--steps 4500] [--install]

1. `dataset.write_dataset` renders `count` training chats from `seed`, each with up to four questions about
   one scene and then its description (`conversations.py`: several answers per encoded image), and
   `--warmup-steps` x 16 warm-up chats (one shape per scene: its colour, its shape or its description) from
   `seed + 100`; held-out evaluation (one question per chat) uses seed 1000.
2. A byte-level BPE is trained with `tokenizers` on the task's chats (`tokenizer.train_tokenizer`).
3. `init_checkpoint` writes the tiny Idefics3 configuration below with random weights, the tokenizer and the
   processor files (32-px tiles, 128-px longest edge: a scene becomes 4x4 tiles, one per grid cell, + the global
   image, so each cell's image token comes right after its `<row_r_col_c>` marker). With 64-px tiles (2x2 cells
   each) the column inside a tile had to come from the encoder's position embeddings, and the model counted 94%
   of the held-out questions right; with a tile per cell, 100%.
4. `python -m idefics3.finetune finetune --full`, four times: a curriculum. Stage 1 (`--warmup-steps`) on the
   one-shape warm-up teaches the model to look at the image at all, and to tell shapes apart; straight on the
   full mix it stayed blind (loss at the answer-prior level) for 3400+ steps, and after a 400-step warm-up
   it still could not tell a square from a circle. Stage 2 (`--steps`) continues from it on the full mix.
   Stage 3 (`--focus-steps`) goes on with fresh chats (seed + 200) weighted towards the questions that
   stage 2 left weakest: finding an object by its shape (colour questions), comparing columns, counting.
   Stage 4 (`--polish-steps`, seed + 300) weights the two-image questions 4:1 at a lower learning rate: held-out
   two-image 87.9% -> 90.9% and position 70.6% -> 76.5%, the other types staying at 100%.
5. The trained folder is copied to WORK_FOLDER/model (and, with --install, over the packaged model).

Left/right comparisons ("Is the red circle left of the blue square?") stay at chance, and the model gives the
same answer with the two objects swapped, so it has not bound which object is named first. Each of these,
continued from the finished model, left them at chance: 800 more steps weighted 6:1 towards position questions;
600-800 steps of two-object scenes with only that question (the loss did not move from step 1), or with "left"
only (no side to undo); a fourth text layer; a whole list of the shapes "from left to right". A single column
("Which column is the red circle in?") is learnable: 77% after 600 steps; but chats that ask for both columns and
then the comparison (700 steps) left the comparison asked alone at chance. A tokenizer with every task word as
one token (" left" is 4 tokens here, " right" 5) trained far worse from scratch in the same budget (shape 42%,
word 6% after stage 2). An order-free form ("Which is further left, the red circle or the blue square?" -> red),
600 steps weighted 4:1 towards it, stayed at chance too (51%, and 43% for two objects in the same row), as did
"Which column is the red circle in?" after 1200 steps (25%). Probes of the packaged model: no text layer attends
from an image token to its `<row_r_col_c>` marker (0.01-0.07 of the attention, near uniform), so the image
tokens do not know their cell (column decodable at 26-55%, row at 22-80% from causal position alone) and
neither do the descriptions ("at 2 3": column right 0-11% outside column 2). "at the top" works because it only
needs the first object in reading order.

Giving the model that attention did not fix it. An initialisation (`--marker-head`) with one hand-built layer-0
head (a constant query against a marker-flag key, rotated by RoPE to peak one position back, copying one-hot row
and column dimensions of the marker into the image token) had each image token put 1.0 of that head's attention on
its marker at init and still 0.93 after stage 2. Single-object descriptions were then 100% right after stage 1
(the packaged model: 7%), and a linear probe read an object's column from its image token at 71% (row 83%).
After stage 2 (held-out: colour, shape, count, word 100%, two-image 92%, position 68%) left/right was still at
chance (50-58% on 100-300 questions); 600 more steps of the order-free form weighted 4:1 gave 53.5%, and the
same with a fourth text layer added as an identity (at the end, or after layer 1) 44% and 53%. Answers that
write both columns before the verdict ("red 1, blue 3, yes"), 600 steps the same way: the named objects' columns
right 32% and 41% of the time, the verdict 55%. So the cell is in the image token, but finding the token of an
object the question names and comparing two of them is what this model does not learn in this budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..config import Idefics3Config
from ..model.idefics3 import Idefics3ForConditionalGeneration
from .dataset import TRAIN_WEIGHTS, write_dataset
from .marker_head import install_marker_head
from .questions import KINDS
from .scenes import CANVAS, COLOURS, SHAPES, WORDS
from .tokenizer import train_tokenizer, write_image_processor_files

log = logging.getLogger(__name__)

PACKAGED = Path(__file__).resolve().parent / "model"
TILE = 32
VOCAB = 400
VISION = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": TILE, "patch_size": 16}
TEXT = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024}
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.json", "preprocessor_config.json", "processor_config.json",
               "special_tokens_map.json")
WARMUP_STEPS, WARMUP_SEED_OFFSET, BATCH = 1500, 100, 16
COMMON_ARGS = ["--full", "--batch-size", str(BATCH), "--weight-decay", "0.01", "--dtype", "fp32", "--device", "cpu"]
WARMUP_ARGS = ["--lr", "1e-3", "--warmup", "30", "--schedule", "constant"]
MAIN_ARGS = ["--lr", "1.5e-3", "--warmup", "50", "--schedule", "cosine"]
TURNS = 4  # questions per training chat
FOCUS_WEIGHTS = {"colour": 3.0, "shape": 0.5, "count": 2.0, "position": 3.0, "word": 0.5, "two": 2.0}
FOCUS_ARGS = ["--lr", "1e-3", "--warmup", "50", "--schedule", "cosine"]
FOCUS_STEPS, FOCUS_SEED_OFFSET = 2500, 200
POLISH_WEIGHTS = {"colour": 1.0, "shape": 0.5, "count": 1.0, "position": 1.0, "word": 0.5, "two": 4.0}
POLISH_ARGS = ["--lr", "5e-4", "--warmup", "30", "--schedule", "cosine"]
POLISH_STEPS, POLISH_SEED_OFFSET = 600, 300


def tokenizer_corpus(jsonl: Path) -> list[str]:
    """The chats as the template renders them, plus every answer word (so each is a few tokens at most)."""
    texts = []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        for user, assistant in zip(msgs[::2], msgs[1::2]):
            question, answer = user["content"][-1]["text"], assistant["content"][0]["text"]
            texts.append(f"User:{question}<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n")
    words = [*COLOURS, *SHAPES, *WORDS, "yes", "no", "first", "second", *map(str, range(10))]
    return texts + [f"Assistant: {w}" for w in words] * 50


def init_checkpoint(folder: str | Path, texts: list[str], seed: int = 0, marker_head: bool = False) -> Path:
    """A random-weight checkpoint of the demo configuration with a tokenizer trained on `texts` (and, with
    `marker_head`, the structured layer-0 head of marker_head.py: the experiment in the module docstring)."""
    folder = Path(folder)
    ids = train_tokenizer(texts, vocab_size=VOCAB, folder=folder)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    bos, eos, pad = ids["<|im_start|>"], ids["<end_of_utterance>"], ids["<|im_end|>"]
    raw = {"model_type": "idefics3", "scale_factor": 2, "image_token_id": ids["<image>"],
           "tie_word_embeddings": False, "pad_token_id": pad, "torch_dtype": "float32",
           "vision_config": dict(VISION),
           "text_config": {**TEXT, "vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos,
                           "pad_token_id": pad}}
    config = Idefics3Config.from_dict(raw)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    if marker_head:
        install_marker_head(model, ids)
    model.save_pretrained(folder)
    gen = {"bos_token_id": bos, "eos_token_id": [eos], "pad_token_id": pad, "max_new_tokens": 8}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_image_processor_files(folder, tile=TILE, longest_edge=CANVAS, image_seq_len=config.image_seq_len)
    return folder


def finetune_command(model: Path, data: Path, output: Path, steps: int, seed: int,
                     stage_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "idefics3.finetune", "finetune", "--model", str(model), "--data", str(data),
            "--output", str(output), "--max-steps", str(steps), "--seed", str(seed), *COMMON_ARGS, *stage_args]


def run_finetune(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    # One thread: this model's matrices are so small that a second thread costs more than it gives,
    # and far more when the cores are shared.
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def install(trained: Path, dest: Path) -> Path:
    """Copy the model files (not the training logs) of `trained` into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (trained / name).is_file():
            shutil.copy2(trained / name, dest / name)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", help="folder for the data, the initial and the trained checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    ap.add_argument("--count", type=int, default=40000, help="training questions")
    ap.add_argument("--steps", type=int, default=4500, help="main-stage optimiser steps of 16 questions")
    ap.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="stage-1 steps (one-shape scenes)")
    ap.add_argument("--warmup-style", choices=["described", "questions"], default="described",
                    help="stage-1 chats: a colour or shape question then the description, or the question alone")
    ap.add_argument("--focus-steps", type=int, default=FOCUS_STEPS, help="stage-3 steps (0: none)")
    ap.add_argument("--polish-steps", type=int, default=POLISH_STEPS, help="stage-4 steps (0: none)")
    ap.add_argument("--marker-head", action="store_true",
                    help="start from the hand-built marker head (marker_head.py; an experiment, see above)")
    ap.add_argument("--install", action="store_true", help=f"copy the result over {PACKAGED}")
    args = ap.parse_args()
    work = Path(args.work)
    start = time.monotonic()
    data = write_dataset(work / "data", args.seed, args.count, TRAIN_WEIGHTS, name="train.jsonl", turns=TURNS)
    warm_count = args.warmup_steps * BATCH  # each warm-up example seen once
    warm = write_dataset(work / "data", args.seed + WARMUP_SEED_OFFSET, warm_count, name="warmup.jsonl", warmup=True,
                         turns=1 if args.warmup_style == "questions" else 2)
    print(f"data: {args.count} chats of up to {TURNS} questions ({', '.join(KINDS)}) + {warm_count} warm-up in "
          f"{time.monotonic() - start:.0f}s", flush=True)
    init = init_checkpoint(work / "init", tokenizer_corpus(data), seed=args.seed, marker_head=args.marker_head)
    run_finetune(finetune_command(init, warm, work / "stage1", args.warmup_steps, args.seed, WARMUP_ARGS))
    run_finetune(finetune_command(work / "stage1", data, work / "trained", args.steps, args.seed, MAIN_ARGS))
    final = work / "trained"
    if args.focus_steps > 0:
        focus = write_dataset(work / "data", args.seed + FOCUS_SEED_OFFSET, args.focus_steps * BATCH, FOCUS_WEIGHTS,
                              name="focus.jsonl", turns=TURNS)
        final = work / "focused"
        run_finetune(finetune_command(work / "trained", focus, final, args.focus_steps, args.seed, FOCUS_ARGS))
    if args.polish_steps > 0:
        polish = write_dataset(work / "data", args.seed + POLISH_SEED_OFFSET, args.polish_steps * BATCH,
                               POLISH_WEIGHTS, name="polish.jsonl", turns=TURNS)
        run_finetune(finetune_command(final, polish, work / "polished", args.polish_steps, args.seed, POLISH_ARGS))
        final = work / "polished"
    model = install(final, work / "model")
    if args.install:
        install(model, PACKAGED)
    print(f"done in {(time.monotonic() - start) / 60:.1f} min: {model}", flush=True)


if __name__ == "__main__":
    main()
