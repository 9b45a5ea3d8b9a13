"""Held-out evaluation on the demo task: exact-match accuracy per question type.

    idefics3 eval [--model M] [--seed 1000] [--count 200]   (parser in demo/commands.py)

The questions come from `questions.examples(seed, count)` with equal shares of every type; the packaged model
was trained on seed 0, so any other seed is held out. An answer counts when it equals the expected one after
trimming spaces and a final full stop, ignoring case. `answer(...)` is the one-question helper that the demo
command shares (a thin use of `idefics3.ask`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..loading import ask, load_model, load_processor, resolve_model
from .questions import KINDS, Example, examples

if TYPE_CHECKING:  # the network class, for type hints only
    from ..model.idefics3 import Idefics3

MAX_NEW_TOKENS = 8


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def answer(model: Idefics3, processor: Any, images: list[Image.Image], question: str,
           max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's greedy answer to `question` about `images` (given before the question)."""
    return ask(model, processor, question, images, max_new_tokens=max_new_tokens).strip()


@dataclass
class Record:
    kind: str
    question: str
    expected: str
    got: str
    seconds: float

    @property
    def correct(self) -> bool:
        return normalise(self.got) == normalise(self.expected)


@dataclass
class EvalReport:
    records: list[Record] = field(default_factory=list)

    def accuracy(self, kind: str | None = None) -> float:
        rows = [r for r in self.records if kind is None or r.kind == kind]
        return sum(r.correct for r in rows) / len(rows) if rows else float("nan")

    def counts(self, kind: str) -> tuple[int, int]:
        rows = [r for r in self.records if r.kind == kind]
        return sum(r.correct for r in rows), len(rows)

    def lines(self) -> list[str]:
        """The table `idefics3 eval` prints."""
        out = []
        for kind in KINDS:
            right, total = self.counts(kind)
            if total:
                out.append(f"{kind:<9} {right:>4}/{total:<4} {100 * right / total:6.1f}%")
        total_s = sum(r.seconds for r in self.records)
        n = len(self.records)
        out.append(f"{'all':<9} {sum(r.correct for r in self.records):>4}/{n:<4} {100 * self.accuracy():6.1f}%   "
                   f"({total_s:.1f}s, {1000 * total_s / max(1, n):.0f} ms per question)")
        return out


def evaluate(model: Idefics3, processor: Any, seed: int = 1000, count: int = 200,
             on_record: Callable[[Record], None] | None = None) -> EvalReport:
    """Ask `count` held-out questions drawn from `seed`; return every answer with its timing."""
    report = EvalReport()
    for ex in examples(seed, count):
        report.records.append(_ask(model, processor, ex))
        if on_record is not None:
            on_record(report.records[-1])
    return report


def _ask(model: Idefics3, processor: Any, ex: Example) -> Record:
    start = time.perf_counter()
    got = answer(model, processor, ex.images, ex.question)
    return Record(ex.kind, ex.question, ex.answer, got, time.perf_counter() - start)


def run_eval(args: argparse.Namespace) -> int:
    """`idefics3 eval`: load the model, ask, print one line per type (and the wrong answers if asked)."""
    if args.count <= 0:
        raise ValueError(f"--count must be positive, got {args.count}")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    processor = load_processor(folder, longest_edge=args.longest_edge, split=not args.no_split)
    model = load_model(folder, device=args.device)
    print(f"model: {folder}\nquestions: {args.count} from seed {args.seed}")
    report = evaluate(model, processor, args.seed, args.count)
    if args.show_errors:
        for r in report.records:
            if not r.correct:
                print(f"  [{r.kind}] {r.question} expected {r.expected!r}, got {r.got!r}")
    for line in report.lines():
        print(line)
    return 0
