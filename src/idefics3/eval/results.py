"""What a finished task leaves behind: the results JSON, the submission file of a hidden-answer split, and the
table printed at the end (one row per task, as model cards print them, then each task's breakdown).

Scores are percentages. The main score is taken over the samples that produced an answer; samples that failed
(an undecodable image, a prompt over the context) are counted and named by reason beside it, never silently
dropped. The results JSON also records how the numbers were made: the model, its dtype, device and
quantisation (or the server), the prompt style and version, the generation settings, the data files, the
idefics3 version and git commit, and when and how long it ran.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .task import Summary, Task


@dataclass
class TaskResult:
    task: Task
    split: str
    summary: Summary
    records: list[dict[str, Any]]
    total: int                                   # samples selected
    errors: dict[str, int] = field(default_factory=dict)
    submission: Path | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def hidden(self) -> bool:
        return self.summary.scored == 0 and self.submission is not None


def error_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Failed samples by reason (the part of the error before its first colon)."""
    return dict(Counter(str(r["error"]).split(":")[0] for r in records if r.get("error")))


def git_commit() -> str | None:
    """The commit of the idefics3 source tree this runs from (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def results_json(result: TaskResult, run: dict[str, Any]) -> dict[str, Any]:
    s = result.summary
    return {
        "task": result.task.name, "title": result.task.title, "split": result.split,
        "metric": result.task.metric, "score": None if s.score is None else round(s.score, 4),
        "metrics": {k: round(v, 4) for k, v in s.metrics.items()},
        "breakdown": {k: {v: {"score": round(x["score"], 4), "n": x["n"]} for v, x in groups.items()}
                      for k, groups in s.breakdown.items()},
        "samples": result.total, "scored": s.scored, "failed": sum(result.errors.values()), "errors": result.errors,
        "submission": None if result.submission is None else str(result.submission),
        "notes": s.notes, **run, "files": result.files,
    }


def _score_text(result: TaskResult) -> str:
    if result.hidden:
        return "submission"
    return "-" if result.summary.score is None else f"{result.summary.score:.1f}"


def table(results: Sequence[TaskResult]) -> list[str]:
    """The summary table: task, split, samples, metric, score, and what is reported beside it."""
    rows = [("task", "split", "samples", "metric", "score", "notes")]
    for r in results:
        notes = [f"{k} {v:.1f}" for k, v in r.summary.metrics.items() if not k.endswith("_score")]
        notes += [f"{k} {v:g}" for k, v in r.summary.metrics.items() if k.endswith("_score")]
        if r.errors:
            notes.append(f"failed {sum(r.errors.values())} ({', '.join(f'{k} {v}' for k, v in r.errors.items())})")
        rows.append((r.task.title, r.split, f"{r.summary.scored}/{r.total}", r.task.metric, _score_text(r),
                     "; ".join(notes)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i != 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             + ("  " + row[5] if row[5] else "") for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return lines


def breakdown_lines(result: TaskResult, limit: int = 40) -> list[str]:
    """Per-category scores under a task (its own lines where the task prints its own table)."""
    custom = result.task.table_lines(result.summary, result.records)
    if custom is not None:
        return custom
    lines = []
    for key, groups in result.summary.breakdown.items():
        if len(groups) < 2:
            continue
        lines.append(f"{result.task.title} by {key}:")
        for value, x in list(groups.items())[:limit]:
            lines.append(f"  {value:<40} {x['score']:6.1f}  (n={x['n']})")
        if len(groups) > limit:
            lines.append(f"  ... {len(groups) - limit} more in the results JSON")
    return lines
