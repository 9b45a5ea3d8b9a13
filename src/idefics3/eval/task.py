"""What a benchmark is to the harness: a `Task` turns a split's rows into `Sample`s, a sample into a `Prompt`,
and an answer into a `Scored`; the runner does the rest (generation, records, resuming, sharding).

A sample keeps the row's columns the task needs (`fields`), its images as references that load when the sample
runs, its `references` (None where the split hides them: a test split that is scored by a leaderboard), and its
`categories` (the values its scores are broken down by, e.g. MMMU's subject). Records written per sample hold
everything aggregation needs, so final scores can always be recomputed from the per-sample file alone
(`Task.summary`): that is what makes resuming and merging ranks give the same numbers as one uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from .data import ImageRef, MemoryImage, read_rows
from .prompts import PromptSettings


@dataclass
class Sample:
    id: str
    index: int                                  # position in the split: the order of every output
    fields: dict[str, Any]
    images: list[ImageRef | MemoryImage]
    references: Any = None                      # None: hidden (a test split)
    categories: dict[str, Any] = field(default_factory=dict)  # a value, or a list of values (several labels)


@dataclass(frozen=True)
class Prompt:
    text: str         # the user turn's text; images go before it unless it places "<image>" itself
    prefix: str = ""  # written after the assistant turn's opening, before the model's answer (" Answer:")


@dataclass
class Scored:
    score: float | None                                   # in [0, 1]; None when there are no references
    parsed: Any = None                                    # what the rules read from the answer
    flags: dict[str, bool] = field(default_factory=dict)  # e.g. fallback / unparsed / random
    extra: dict[str, float] = field(default_factory=dict)  # secondary scores, e.g. VLMEvalKit's rules


@dataclass
class Summary:
    """A task's numbers: the main score (percent, as model cards print them) and what is reported beside it."""

    score: float | None
    scored: int
    metrics: dict[str, float] = field(default_factory=dict)
    breakdown: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # key -> value -> score, n
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None  # how long this run's answers took (for tables that print a rate)


class Task:
    """A benchmark. Subclasses set the class attributes and `make_sample` / `prompt` / `score`."""

    name: str = ""
    title: str = ""                              # as model cards name it
    metric: str = "accuracy"                     # the main score's name
    hub: tuple[str, ...] = ()                    # Hub dataset repositories, the first is the one to download
    config: str | None = None                    # the config folder to read when the repository has several
    default_split: str = "validation"
    columns: tuple[str, ...] = ()                # plain columns the layout must have
    optional: tuple[str, ...] = ()               # read when present (e.g. answers, missing from test splits)
    image_columns: tuple[str, ...] = ("image",)
    single_files: dict[str, str] = {}            # file stem -> split, for datasets published as one file
    breakdowns: tuple[str, ...] = ()             # category keys the score is broken down by
    max_new_tokens: int = 32
    needs_data: bool = True

    @property
    def layout(self) -> str:
        return self.hub[0] if self.hub else self.name

    # ---- data -------------------------------------------------------------------------------------------
    def samples(self, files: Sequence[Path], split: str) -> Iterator[Sample]:
        rows = read_rows(files, self.columns, self.image_columns, self.name, self.layout, self.optional)
        for index, (row, images) in enumerate(rows):
            yield self.make_sample(row, images, index, split)

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        raise NotImplementedError

    # ---- asking and scoring -----------------------------------------------------------------------------
    def prompt(self, sample: Sample, settings: PromptSettings) -> Prompt:
        return Prompt(f"{settings.pre}{sample.fields['question']}{settings.post}", settings.prefix)

    def score(self, answer: str, sample: Sample) -> Scored:
        raise NotImplementedError

    # ---- aggregation (from records: dicts as the runner writes them) -------------------------------------
    def summary(self, records: Sequence[dict[str, Any]]) -> Summary:
        scored = [r for r in records if r.get("score") is not None]
        main = 100 * mean(r["score"] for r in scored) if scored else None
        out = Summary(main, len(scored))
        for key in self.breakdowns:
            groups: dict[str, list[float]] = {}
            for r in scored:
                value = r.get("categories", {}).get(key)
                for v in value if isinstance(value, list) else [value]:
                    if v is not None:
                        groups.setdefault(str(v), []).append(r["score"])
            out.breakdown[key] = {v: {"score": 100 * mean(s), "n": len(s)} for v, s in sorted(groups.items())}
        extras = sorted({k for r in scored for k in r.get("extra", {})})
        for name in extras:
            values = [r["extra"][name] for r in scored if name in r.get("extra", {})]
            out.metrics[name] = 100 * mean(values)
        flags = sorted({k for r in scored for k, v in r.get("flags", {}).items()})
        for name in flags:
            out.metrics[f"{name}_share"] = 100 * mean(bool(r.get("flags", {}).get(name)) for r in scored)
        self.add_metrics(out, scored)
        return out

    def add_metrics(self, summary: Summary, scored: Sequence[dict[str, Any]]) -> None:
        """Task-specific numbers beside the main score (an l2 average, a final score out of 1000, ...)."""

    def submission(self, records: Sequence[dict[str, Any]]) -> Any:
        """What the split's leaderboard takes when its answers are hidden (None: this task has none)."""
        return None

    def table_lines(self, summary: Summary, records: Sequence[dict[str, Any]]) -> list[str] | None:
        """Lines to print under the results table (None: the default breakdown)."""
        return None
