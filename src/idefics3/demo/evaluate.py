"""Held-out evaluation on the demo task: exact-match accuracy per question type.

    idefics3 eval [--model M] [--seed 1000] [--count 200]       (= idefics3 eval --task shapes ...)

`ShapesTask` is the check as a task of the evaluation harness (idefics3.eval): the questions come from
`questions.examples(seed, count)` with equal shares of every type (the packaged model was trained on seed 0, so
any other seed is held out), they go through the engine many at a time like any benchmark's, and an answer
counts when it equals the expected one after trimming spaces and a final full stop, ignoring case. Its table is
the one `idefics3 eval` always printed: one line per question type, then all of them with the time taken.

`evaluate(...)` asks the same questions one at a time with `idefics3.ask` (the reference the engine's answers are
tested against, and what bench/demo_eval.py times); `answer(...)` is the one-question helper that the demo
command shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..eval.data import MemoryImage
from ..eval.task import Sample, Scored, Summary, Task
from ..loading import ask
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


def accuracy_lines(rows: Sequence[tuple[str, bool]], seconds: float) -> list[str]:
    """The table `idefics3 eval` prints: (kind, correct) per question, and the time all of them took."""
    out = []
    for kind in KINDS:
        marks = [ok for k, ok in rows if k == kind]
        if marks:
            out.append(f"{kind:<9} {sum(marks):>4}/{len(marks):<4} {100 * sum(marks) / len(marks):6.1f}%")
    n = len(rows)
    right = sum(ok for _, ok in rows)
    out.append(f"{'all':<9} {right:>4}/{n:<4} {100 * right / max(1, n):6.1f}%   "
               f"({seconds:.1f}s, {1000 * seconds / max(1, n):.0f} ms per question)")
    return out


class ShapesTask(Task):
    """The demo's held-out questions as a harness task (no data files: the scenes are drawn from the seed)."""

    name, title, metric = "shapes", "demo shapes", "exact match"
    needs_data = False
    breakdowns = ("kind",)
    max_new_tokens = MAX_NEW_TOKENS

    def __init__(self, seed: int = 1000, count: int = 200) -> None:
        self.seed, self.count = seed, count
        self.default_split = f"seed{seed}"

    @property
    def heading(self) -> str:
        return f"questions: {self.count} from seed {self.seed}"

    def samples(self, files: Sequence[Path], split: str) -> Iterator[Sample]:
        for i, ex in enumerate(examples(self.seed, self.count)):
            yield Sample(f"{self.seed}-{i}", i, {"question": ex.question}, [MemoryImage(im) for im in ex.images],
                         ex.answer, {"kind": ex.kind})

    def score(self, answer: str, sample: Sample) -> Scored:
        return Scored(float(normalise(answer) == normalise(sample.references)))

    def table_lines(self, summary: Summary, records: Sequence[dict[str, Any]]) -> list[str]:
        rows = [(r["categories"].get("kind", ""), bool(r.get("score"))) for r in records]
        return accuracy_lines(rows, summary.seconds or 0.0)


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
        return accuracy_lines([(r.kind, r.correct) for r in self.records], sum(r.seconds for r in self.records))


def evaluate(model: Idefics3, processor: Any, seed: int = 1000, count: int = 200,
             on_record: Callable[[Record], None] | None = None) -> EvalReport:
    """Ask `count` held-out questions drawn from `seed`, one at a time; return every answer with its timing."""
    report = EvalReport()
    for ex in examples(seed, count):
        report.records.append(_ask(model, processor, ex))
        if on_record is not None:
            on_record(report.records[-1])
    return report


def _ask(model: Idefics3, processor: Any, ex: Example) -> Record:
    import time

    start = time.perf_counter()
    got = answer(model, processor, ex.images, ex.question)
    return Record(ex.kind, ex.question, ex.answer, got, time.perf_counter() - start)
