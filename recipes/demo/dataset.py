"""Write the demo task as fine-tuning data: PNG files plus a JSONL of chats that `idefics3 finetune` reads.

    python -m recipes.demo.dataset OUT_FOLDER --seed 0 --count 20000

Each line is {"messages": [...], "kind": ...} with image parts naming PNGs relative to the JSONL file.
The same seed always writes the same files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from idefics3.demo.questions import KINDS, Example, examples

from .conversations import conversations, warmup_conversations, warmup_examples

# Training mix: the types that need finer looking get more examples.
TRAIN_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 1.5, "position": 1.5, "word": 1.5, "two": 1.5}


def write_dataset(folder: str | Path, seed: int, count: int, weights: dict[str, float] | None = None,
                  name: str = "data.jsonl", warmup: bool = False, turns: int = 1) -> Path:
    """Render `count` examples from `seed` into `folder`/images and `folder`/`name`; return the JSONL path.
    warmup: the curriculum's one-shape scenes (`conversations.warmup_examples`) instead of the task mix;
    turns > 1: chats of up to `turns` questions about one scene (`conversations.conversations`), or for the
    warm-up each question followed by the scene's description."""
    if warmup:
        source = warmup_conversations(seed, count) if turns > 1 else warmup_examples(seed, count)
    elif turns > 1:
        source = conversations(seed, count, weights or TRAIN_WEIGHTS, turns)
    else:
        source = examples(seed, count, weights)
    return write_examples(folder, source, name)


def write_examples(folder: str | Path, source: Iterable[Example], name: str) -> Path:
    """Render the chats of `source` into `folder`/images and `folder`/`name`; return the JSONL path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / name
    stem = Path(name).stem
    with path.open("w", encoding="utf-8") as f:
        for i, ex in enumerate(source):
            rels = []
            for j, image in enumerate(ex.images):
                rel = f"images/{stem}-{i:06d}-{j}.png"
                image.save(folder / rel)
                rels.append(rel)
            f.write(json.dumps({"messages": ex.messages(rels), "kind": ex.kind}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--equal", action="store_true", help=f"equal shares of {', '.join(KINDS)}")
    ap.add_argument("--turns", type=int, default=1, help="questions per chat (several about one scene)")
    args = ap.parse_args()
    weights = {k: 1.0 for k in KINDS} if args.equal else TRAIN_WEIGHTS
    print(write_dataset(args.folder, args.seed, args.count, weights, turns=args.turns))


if __name__ == "__main__":
    main()
