"""The recipe of the packaged demo model: data, tokenizer, a random-init checkpoint, `idefics3 finetune --full`.

    python -m idefics3.demo.recipe WORK_FOLDER [--seed 0] [--count 40000] [--steps 4500] [--kv-heads 2]
                                   [--resume] [--install]

1. `dataset.write_dataset` renders `count` training chats from `seed`, each with up to four questions about
   one scene and then its description (`conversations.py`: several answers per encoded image), and
   `--warmup-steps` x 16 warm-up chats (one shape per scene: its colour, its shape or its description) from
   `seed + 100`; held-out evaluation (one question per chat) uses seed 1000.
2. A byte-level BPE is trained with `tokenizers` on the task's chats (`tokenizer.train_tokenizer`).
3. `init_checkpoint` writes the tiny Idefics3 configuration below with random weights, the tokenizer and the
   processor files (32-px tiles, 128-px longest edge: a scene becomes 4x4 tiles, one per grid cell, + the global
   image, so each cell's image token comes right after its `<row_r_col_c>` marker), and writes one hand-built
   head into layer 0 that copies each image token's marker into it (`marker_head.py`): from a plain random
   start no text layer ever learnt to look from an image token to its marker, so no image token knew its cell.
4. `python -m idefics3.finetune finetune --full`, six times: a curriculum, each stage starting from the last.
   1. Warm-up (`--warmup-steps`) on the one-shape chats: it teaches the model to look at the image at all and to
      tell shapes apart; straight on the full mix it stayed blind (loss at the answer-prior level) for 3400+
      steps.
   2. Main (`--steps`) on the full mix.
   3. Edges (`--edge-steps`, seed + 400): scenes of 2-4 shapes, only "What colour is the shape on the
      left/right?" (`conversations.position_conversations`).
   4. Comparisons (`--compare-steps`, seed + 500): the same scenes, one edge question and up to three "Is the
      red circle left of the blue square?".
   5. Focus (`--focus-steps`, seed + 200) on the full mix weighted towards colour, position, counting and two
      images: it
      brings back what stages 3-4 made the model forget (after them: shape 0%, colour by shape near chance).
   6. Polish (`--polish-steps`, seed + 300): the mix weighted 4:1 towards two-image questions, lower learning rate.
5. The trained folder is copied to WORK_FOLDER/model (and, with --install, over the packaged model).
   `--resume` keeps every stage whose folder already holds a model.safetensors.

Left/right took most of the work. On the full mix, "Is the red circle left of the blue square?" stayed at
chance through every variant tried (up to 800 more steps weighted 6:1 towards it, an order-free "Which is
further left?", "left" only, a fourth text layer, answers that spell out both columns first), with and without
the marker head; so did "What colour is the shape on the left?" after 600 steps (36%, chance 1/2-1/4) and after
stage 2 here (47-61%). "at the top" works from the start: it only needs the first object in reading order.
What works is time on position alone, edges first. Continued from stage 2 with the marker head, 1000 steps of
two-shape edge questions gave 62% and 2000 more on 2-4 shapes 98%; then 1500 steps of comparisons 87% and 1500
more 99%, every other question type collapsing meanwhile (shape 0%) until the focus stage restored them.
The packaged model, this recipe at seed 0 (held-out seed 1000, 200 questions): after stage 2 left/right 47-61%
(edges) and 52% (comparisons); after stage 3 edges 100%; after stage 4 comparisons 84%; after stage 5 colour
94%, shape 91%, count 97%, position and word 100%, two images 79%; after stage 6 two images 88% and the rest
100%. Stage 6 at 600 steps left two images at 82% (count 94%); a focus stage weighted towards colour
(4:2.5:2 colour:two:count, position 1.5, 3000 steps) ended at two images 85%.
Two-image questions are what the packaged model misses. On 300 of them (seed 7000) it gets "Which image has more
shapes?" 99% right but "... more circles?" 77% (1 against 2 of them: 57-69%), 83% overall, and 81% already
after stage 2. Four last stages from the same stage 5 all ended at 82-83%: the polish above; 1200 steps whose
two-image chats end with "How many circles are in the first image?" for both images (79%); 1500 steps whose
first two-image question compares counts one apart (83%); 1500 steps at lr 1e-3 (82%). The recipe before the
marker head (f721744) got 92%. With one key/value head per query head and the marker head's key/value head
read by query head 0 alone (`install_marker_head(readers=1)`) stage 2 ends at 91% and the last stage at 97-99%
(seeds 1000, 2000, 7000), but "Is the A left of the B?" never leaves chance: stage 4's loss stayed flat (0.17)
for 1500 steps after 1000 edge steps and for 1700 after 2000, and position ended at 65-70% (54% on the
comparisons). Under the default two key/value heads, query head 1 shares the marker head's keys and values and
so reads the markers' cells too; `install_marker_head(readers=2)` keeps that with four (see marker_head.py).
Checked: with four and two readers (and the shorter lengths below) the comparisons learn again (91% after
stage 4) but two images are back at 83% after stage 2; that run ended at colour and shape 97%, count and
position 91%, word 18%, two 79% (its 2000-step focus and 1200-step polish restore far less than the default
lengths do).
Time on 2 idle cores (two training threads, measured with `--kv-heads 4`): warm-up 4.4 min, main 20.0 min for
4000 steps, edges 6.0 min for 2000, comparisons 6.0 for 1500, focus 9.8 for 2000, polish 6.0 for 1200 (stage
data included), 34 s for the data and the initial checkpoint: ~66 min at the default lengths; the run with
`--kv-heads 4 --steps 4000 --compare-steps 2500 --focus-steps 2000 --polish-steps 1200` took 59.3 min.
Other layouts tried and dropped: 8-px patches with a 4x pixel shuffle (the global image becomes one token with a
slot per cell): shapes at chance after stage 1 (28%); 64-px tiles with a 4x shuffle (one token per 2x2 cells):
after stage 2 words 10%, colour 70%, left/right still at chance; a tokenizer with every task word one token
trained far worse (shape 42%, word 6% after stage 2).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Idefics3Config
from ..model.idefics3 import Idefics3ForConditionalGeneration
from .conversations import position_conversations
from .dataset import TRAIN_WEIGHTS, write_dataset, write_examples
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
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024}
KV_HEADS = 2  # of 4 query heads (4: one each, the marker head still read by two; see above)
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.json", "preprocessor_config.json", "processor_config.json",
               "special_tokens_map.json")
WARMUP_STEPS, WARMUP_SEED_OFFSET, BATCH = 1500, 100, 16
COMMON_ARGS = ["--full", "--batch-size", str(BATCH), "--weight-decay", "0.01", "--dtype", "fp32", "--device", "cpu"]
WARMUP_ARGS = ["--lr", "1e-3", "--warmup", "30", "--schedule", "constant"]
MAIN_ARGS = ["--lr", "1.5e-3", "--warmup", "50", "--schedule", "cosine"]
MAIN_STEPS = 4500
TURNS = 4  # questions per training chat
FOCUS_WEIGHTS = {"colour": 3.0, "shape": 0.5, "count": 2.0, "position": 3.0, "word": 0.5, "two": 2.0}
FOCUS_ARGS = ["--lr", "1e-3", "--warmup", "50", "--schedule", "cosine"]
FOCUS_STEPS, FOCUS_SEED_OFFSET = 2500, 200
POLISH_WEIGHTS = {"colour": 1.0, "shape": 0.5, "count": 1.0, "position": 1.0, "word": 0.5, "two": 4.0}
POLISH_ARGS = ["--lr", "5e-4", "--warmup", "30", "--schedule", "cosine"]
POLISH_STEPS, POLISH_SEED_OFFSET = 2000, 300
POSITION_ARGS = ["--lr", "1e-3", "--warmup", "30", "--schedule", "constant"]
EDGE_STEPS, EDGE_SEED_OFFSET = 2000, 400
COMPARE_STEPS, COMPARE_SEED_OFFSET, COMPARE_TURNS = 3000, 500, 3


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
                    kv_heads: int = KV_HEADS) -> Path:
    """A random-weight checkpoint of the demo configuration (with `kv_heads` key/value heads) with a tokenizer
    trained on `texts` (and, with `marker_head`, the structured layer-0 head of marker_head.py, see the module
    docstring)."""
    folder = Path(folder)
    ids = train_tokenizer(texts, vocab_size=VOCAB, folder=folder)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    bos, eos, pad = ids["<|im_start|>"], ids["<end_of_utterance>"], ids["<|im_end|>"]
    raw = {"model_type": "idefics3", "scale_factor": 2, "image_token_id": ids["<image>"],
           "tie_word_embeddings": False, "pad_token_id": pad, "torch_dtype": "float32",
           "vision_config": dict(VISION),
           "text_config": {**TEXT, "num_key_value_heads": kv_heads, "vocab_size": vocab, "bos_token_id": bos,
                           "eos_token_id": eos, "pad_token_id": pad}}
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
    # torch's default threads (one per core): on an idle 2-core machine two threads train ~1.35x faster than
    # one; set OMP_NUM_THREADS=1 when the cores are shared (two recipes side by side).
    subprocess.run(cmd, check=True)


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
    ap.add_argument("--steps", type=int, default=MAIN_STEPS, help="main-stage optimiser steps of 16 questions")
    ap.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="stage-1 steps (one-shape scenes)")
    ap.add_argument("--warmup-style", choices=["described", "questions"], default="described",
                    help="stage-1 chats: a colour or shape question then the description, or the question alone")
    ap.add_argument("--edge-steps", type=int, default=EDGE_STEPS, help="stage-3 steps (0: none)")
    ap.add_argument("--compare-steps", type=int, default=COMPARE_STEPS, help="stage-4 steps (0: none)")
    ap.add_argument("--focus-steps", type=int, default=FOCUS_STEPS, help="stage-5 steps (0: none)")
    ap.add_argument("--polish-steps", type=int, default=POLISH_STEPS, help="stage-6 steps (0: none)")
    ap.add_argument("--no-marker-head", action="store_true",
                    help="start from a plain random initialisation (left/right then stays at chance, see above)")
    ap.add_argument("--kv-heads", type=int, default=KV_HEADS, choices=[1, 2, 4],
                    help="key/value heads of the text model (4 query heads; see above)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the stages already trained in WORK (those with a model.safetensors)")
    ap.add_argument("--install", action="store_true", help=f"copy the result over {PACKAGED}")
    args = ap.parse_args()
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
                        kv_heads=args.kv_heads)
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

    def position(offset: int, steps: int, relational: int, name: str) -> Callable[[], Path]:
        return lambda: write_examples(work / "data", position_conversations(args.seed + offset, steps * BATCH,
                                                                            relational), name)

    stage("stage1", args.warmup_steps, WARMUP_ARGS, warm)
    stage("trained", args.steps, MAIN_ARGS, data)
    stage("edges", args.edge_steps, POSITION_ARGS, position(EDGE_SEED_OFFSET, args.edge_steps, 0, "edges.jsonl"))
    stage("compared", args.compare_steps, POSITION_ARGS,
          position(COMPARE_SEED_OFFSET, args.compare_steps, COMPARE_TURNS, "compare.jsonl"))
    stage("focused", args.focus_steps, FOCUS_ARGS, mix(FOCUS_SEED_OFFSET, args.focus_steps, FOCUS_WEIGHTS, "focus.jsonl"))
    stage("polished", args.polish_steps, POLISH_ARGS,
          mix(POLISH_SEED_OFFSET, args.polish_steps, POLISH_WEIGHTS, "polish.jsonl"))
    installed = install(model, work / "model")
    if args.install:
        install(installed, PACKAGED)
    print(f"done in {(time.monotonic() - start) / 60:.1f} min: {installed}", flush=True)


if __name__ == "__main__":
    main()
