"""The recipe of the packaged demo model: data, tokenizer, a random-init checkpoint, `idefics3 finetune --full`.

Run from the repository root (it imports the installed `idefics3`; --install overwrites src/idefics3/demo/model):

    python -m recipes.demo.recipe WORK_FOLDER [--seed 0] [--count 40000] [--steps 4000] [--heads 6]
                                  [--kv-heads 6] [--replay 0.4] [--resume] [--install]

1. `dataset.write_dataset` renders `count` training chats from `seed`, each with up to four questions about
   one scene and then its description (`conversations.py`: several answers per encoded image), and
   `--warmup-steps` x 16 warm-up chats (one shape per scene: its colour, its shape or its description) from
   `seed + 100`; held-out evaluation (one question per chat) uses seed 1000.
2. A byte-level BPE is trained with `tokenizers` on the task's chats (`tokenizer.train_tokenizer`).
3. `init_checkpoint` (`random_checkpoint.write_checkpoint`) writes the tiny Idefics3 configuration below (text:
   3 layers of width 128, 6 query heads of 32, one key/value head each) with random weights, the tokenizer and
   the processor files (32-px tiles, 128-px longest edge: a scene becomes 4x4 tiles, one per grid cell, + the
   global image, so each cell's image token comes right after its `<row_r_col_c>` marker), and writes one
   hand-built head into layer 0 that copies each image token's marker into it (`marker_head.py`; query heads 0
   and 1 read it), so that the image tokens know their cells.
4. `python -m idefics3.finetune finetune --full` once per stage of a curriculum, each stage starting from the
   last (five stages by default: the focus stage is off):
   1. Warm-up (`--warmup-steps`) on the one-shape chats: it teaches the model to look at the image at all and to
      tell shapes apart.
   2. Main (`--steps`) on the full mix.
   3. Edges (`--edge-steps`, seed + 400): scenes of 2-4 shapes, only "What colour is the shape on the
      left/right?" (`conversations.position_conversations`).
   4. Comparisons (`--compare-steps`, seed + 500): the same scenes, one edge question and up to three "Is the
      red circle left of the blue square?"; `--replay` (40%) of the chats come from the main mix (seed + 600),
      which keeps the other skills alive.
   5. Focus (`--focus-steps`, seed + 200; off unless asked for): the full mix weighted towards colour, position,
      counting and two images.
   6. Polish (`--polish-steps`, seed + 300): the mix weighted towards colour and two-image questions, at a lower
      learning rate.
5. The trained folder is copied to WORK_FOLDER/model (and, with --install, over the packaged model), its text
   width padded from 128 to 132 with dimensions that stay 0 (`widen.py`: transformers wants the width to be a
   multiple of the 6 heads; the function is the same).
   `--resume` keeps every stage whose folder already holds a model.safetensors.

Each stage prints its time; the whole run takes about an hour on 2 idle cores. Training uses torch's default
threads (one per core); set OMP_NUM_THREADS=1 to run two recipes side by side. Why each step is there, what else
was tried and what it measured: NOTES.md, beside this file.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path

from idefics3.demo.questions import KINDS
from idefics3.demo.scenes import CANVAS, COLOURS, SHAPES, WORDS

from .conversations import conversations, position_conversations
from .dataset import TRAIN_WEIGHTS, write_dataset, write_examples
from .random_checkpoint import write_checkpoint
from .widen import widen

REPOSITORY = Path(__file__).resolve().parents[2]
PACKAGED = REPOSITORY / "src" / "idefics3" / "demo" / "model"  # what --install overwrites
TILE = 32
VOCAB = 400
VISION = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": TILE, "patch_size": 16}
TEXT = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "head_dim": 32,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024}
HEADS, KV_HEADS = 6, 6  # query and key/value heads of the text model (NOTES.md: why six of each)
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.json", "preprocessor_config.json", "processor_config.json",
               "special_tokens_map.json")
WARMUP_STEPS, WARMUP_SEED_OFFSET, BATCH = 1500, 100, 16
COMMON_ARGS = ["--full", "--batch-size", str(BATCH), "--weight-decay", "0.01", "--dtype", "fp32", "--device", "cpu"]
WARMUP_ARGS = ["--lr", "1e-3", "--warmup", "30", "--schedule", "constant"]
MAIN_ARGS = ["--lr", "1.5e-3", "--warmup", "50", "--schedule", "cosine"]
MAIN_STEPS = 4000
TURNS = 4  # questions per training chat
FOCUS_WEIGHTS = {"colour": 3.0, "shape": 0.5, "count": 2.0, "position": 3.0, "word": 0.5, "two": 2.0}
FOCUS_ARGS = ["--lr", "1e-3", "--warmup", "50", "--schedule", "cosine"]
FOCUS_STEPS, FOCUS_SEED_OFFSET = 0, 200  # off: the replay in stage 4 keeps the mix alive
POLISH_WEIGHTS = {"colour": 2.5, "shape": 0.5, "count": 1.0, "position": 1.0, "word": 0.5, "two": 3.5}
POLISH_ARGS = ["--lr", "5e-4", "--warmup", "30", "--schedule", "cosine"]
POLISH_STEPS, POLISH_SEED_OFFSET = 1800, 300
POSITION_ARGS = ["--lr", "1e-3", "--warmup", "30", "--schedule", "constant"]
EDGE_STEPS, EDGE_SEED_OFFSET = 1500, 400
COMPARE_STEPS, COMPARE_SEED_OFFSET, COMPARE_TURNS = 2500, 500, 3
REPLAY, REPLAY_SEED_OFFSET = 0.4, 600  # share of the comparison stage's chats drawn from the main mix


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


def init_checkpoint(folder: str | Path, texts: list[str], seed: int = 0, marker_head: bool = False,
                    heads: int = HEADS, kv_heads: int = KV_HEADS) -> Path:
    """The recipe's starting checkpoint: `random_checkpoint.write_checkpoint` with the demo configuration
    (`heads` query heads, `kv_heads` key/value heads), a tokenizer trained on `texts` and, with `marker_head`,
    the layer-0 head of marker_head.py."""
    return write_checkpoint(folder, texts, vocab_size=VOCAB, vision=VISION,
                            text={**TEXT, "num_attention_heads": heads, "num_key_value_heads": kv_heads},
                            longest_edge=CANVAS, seed=seed, marker_head=marker_head,
                            generation={"max_new_tokens": 8})


def finetune_command(model: Path, data: Path, output: Path, steps: int, seed: int,
                     stage_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "idefics3.finetune", "finetune", "--model", str(model), "--data", str(data),
            "--output", str(output), "--max-steps", str(steps), "--seed", str(seed), *COMMON_ARGS, *stage_args]


def run_finetune(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    # torch's default threads (one per core): on an idle 2-core machine two threads train ~1.35x faster than
    # one; set OMP_NUM_THREADS=1 when the cores are shared (two recipes side by side).
    subprocess.run(cmd, check=True)


def install(trained: Path, dest: Path) -> Path:
    """Copy the model files (not the training logs) of `trained` into `dest`, widened where transformers needs it
    (`widen.py`: the same function at a text width that is a multiple of the head count)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (trained / name).is_file():
            shutil.copy(trained / name, dest / name)
    widen(dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", help="folder for the data, the initial and the trained checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    ap.add_argument("--count", type=int, default=40000, help="training questions")
    ap.add_argument("--steps", type=int, default=MAIN_STEPS, help="main-stage optimiser steps of 16 questions")
    ap.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="stage-1 steps (one-shape scenes)")
    ap.add_argument("--warmup-style", choices=["described", "questions"], default="described",
                    help="stage-1 chats: a colour or shape question then the description, or the question alone")
    ap.add_argument("--edge-steps", type=int, default=EDGE_STEPS, help="stage-3 steps (0: none)")
    ap.add_argument("--compare-steps", type=int, default=COMPARE_STEPS, help="stage-4 steps (0: none)")
    ap.add_argument("--replay", type=float, default=REPLAY,
                    help="share of stage 4's chats taken from the main mix (keeps the other skills alive)")
    ap.add_argument("--focus-steps", type=int, default=FOCUS_STEPS, help="stage-5 steps (0: none)")
    ap.add_argument("--polish-steps", type=int, default=POLISH_STEPS, help="stage-6 steps (0: none)")
    ap.add_argument("--no-marker-head", action="store_true",
                    help="start from a plain random initialisation (left/right then stays at chance: NOTES.md)")
    ap.add_argument("--heads", type=int, default=HEADS, help="query heads of the text model (32 wide each)")
    ap.add_argument("--kv-heads", type=int, default=KV_HEADS,
                    help="key/value heads of the text model (a divisor of --heads; NOTES.md compares them)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the stages already trained in WORK (those with a model.safetensors)")
    ap.add_argument("--install", action="store_true", help=f"copy the result over {PACKAGED}")
    args = ap.parse_args()
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        ap.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if not 0.0 <= args.replay < 1.0:
        ap.error(f"--replay {args.replay} is a share: from 0 up to (not including) 1")
    work = Path(args.work)
    start = time.monotonic()
    warm_count = args.warmup_steps * BATCH  # each warm-up example seen once

    @functools.cache
    def data() -> Path:  # written only when a stage (or the tokenizer) needs it: --resume may skip both
        return write_dataset(work / "data", args.seed, args.count, TRAIN_WEIGHTS, name="train.jsonl", turns=TURNS)

    def warm() -> Path:
        return write_dataset(work / "data", args.seed + WARMUP_SEED_OFFSET, warm_count, name="warmup.jsonl",
                             warmup=True, turns=1 if args.warmup_style == "questions" else 2)

    model = work / "init"
    if not (args.resume and (model / "model.safetensors").is_file()):
        init_checkpoint(model, tokenizer_corpus(data()), seed=args.seed, marker_head=not args.no_marker_head,
                        heads=args.heads, kv_heads=args.kv_heads)
        print(f"data and initial checkpoint: {args.count} chats of up to {TURNS} questions ({', '.join(KINDS)}) in "
              f"{time.monotonic() - start:.0f}s", flush=True)

    def stage(name: str, steps: int, stage_args: list[str], make_data: Callable[[], Path]) -> None:
        nonlocal model
        if steps <= 0:
            return
        output = work / name
        if not (args.resume and (output / "model.safetensors").is_file()):
            began = time.monotonic()
            run_finetune(finetune_command(model, make_data(), output, steps, args.seed, stage_args))
            print(f"stage {name}: {steps} steps (with its data) in {(time.monotonic() - began) / 60:.1f} min",
                  flush=True)
        model = output

    def mix(offset: int, steps: int, weights: dict[str, float], name: str) -> Callable[[], Path]:
        return lambda: write_dataset(work / "data", args.seed + offset, steps * BATCH, weights, name=name, turns=TURNS)

    def position(offset: int, steps: int, relational: int, name: str, replay: float = 0.0) -> Callable[[], Path]:
        mixed = round(steps * BATCH * replay)  # main-mix chats among them, shuffled in by the training stream
        return lambda: write_examples(work / "data", chain(
            position_conversations(args.seed + offset, steps * BATCH - mixed, relational),
            conversations(args.seed + REPLAY_SEED_OFFSET, mixed, TRAIN_WEIGHTS, TURNS)), name)

    stage("stage1", args.warmup_steps, WARMUP_ARGS, warm)
    stage("trained", args.steps, MAIN_ARGS, data)
    stage("edges", args.edge_steps, POSITION_ARGS, position(EDGE_SEED_OFFSET, args.edge_steps, 0, "edges.jsonl"))
    stage("compared", args.compare_steps, POSITION_ARGS,
          position(COMPARE_SEED_OFFSET, args.compare_steps, COMPARE_TURNS, "compare.jsonl", args.replay))
    stage("focused", args.focus_steps, FOCUS_ARGS,
          mix(FOCUS_SEED_OFFSET, args.focus_steps, FOCUS_WEIGHTS, "focus.jsonl"))
    stage("polished", args.polish_steps, POLISH_ARGS,
          mix(POLISH_SEED_OFFSET, args.polish_steps, POLISH_WEIGHTS, "polish.jsonl"))
    installed = install(model, work / "model")
    if args.install:
        install(installed, PACKAGED)
    print(f"done in {(time.monotonic() - start) / 60:.1f} min: {installed}", flush=True)


if __name__ == "__main__":
    main()
