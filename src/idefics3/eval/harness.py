"""One evaluation run: for each task, find the split, skip what is done, answer this rank's share, merge, score.

    results = evaluate(tasks, settings, open_backend, run_info)

Per task: the split's files are located (layouts.py) and its samples listed without images (data.py; `--limit`
keeps the first N in dataset order); with `--resume` every sample already in the task's records is skipped (and
without it, existing records are an error unless `--overwrite`); each rank answers its contiguous share of the
rest (distributed.py) and appends one record per sample (records.py); after a barrier rank 0 merges the records,
scores them all (so a resumed or sharded run gives the numbers of one uninterrupted run), writes the results
JSON (and a submission file where the split's answers are hidden) and returns them for the table. The backend
(local engine or --server) is opened only once some sample needs an answer: a finished run re-scores without
loading the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from .distributed import World, barrier, shard
from .layouts import DataError, locate, split_files
from .progress import Progress
from .prompts import settings_for
from .records import RecordStore, write_json
from .results import TaskResult, error_counts, results_json
from .runner import Job
from .task import Sample, Task

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    data: str | None = None
    data_root: str | None = None
    split: str | None = None
    limit: int | None = None
    output: Path | None = None
    resume: bool = False
    overwrite: bool = False
    style: str = "lmms-eval"
    overrides: dict[str | None, dict[str, str]] = field(default_factory=dict)
    max_new_tokens: int | None = None
    progress: bool = True


class ResultsExist(ValueError):
    """Records of an earlier run are there and neither --resume nor --overwrite was given."""


def list_samples(task: Task, settings: Settings) -> tuple[str, list[Sample], list[Path]]:
    """(split, the selected samples in dataset order, the files they come from)."""
    split = settings.split or task.default_split
    files: list[Path] = []
    if task.needs_data:
        folder = locate(task.name, task.hub, settings.data, settings.data_root)
        files = split_files(folder, split, task.config, task.single_files)
    samples = list(islice(task.samples(files, split), settings.limit))
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"{task.name} {split}: the id {s.id!r} appears twice; ids must be unique to resume")
        seen.add(s.id)
    return split, samples, files


def evaluate(tasks: Sequence[Task], settings: Settings, open_backend: Callable[[], Any], run: dict[str, Any],
             world: World | None = None) -> list[TaskResult]:
    """Run every task (see the module docstring); rank 0 gets the results, other ranks an empty list."""
    world = world or World()
    backend: list[Any] = []  # opened on first need, then shared by the tasks

    def get_backend() -> Any:
        if not backend:
            backend.append(open_backend())
        return backend[0]

    out: list[TaskResult] = []
    for task in tasks:
        result = _run_task(task, settings, get_backend, run, world)
        if result is not None:
            out.append(result)
    return out


def _run_task(task: Task, settings: Settings, get_backend: Callable[[], Any], run: dict[str, Any],
              world: World) -> TaskResult | None:
    split, samples, files = list_samples(task, settings)
    store = RecordStore(settings.output, f"{task.name}-{split}", world.rank)
    if world.is_main and store.files() and not settings.resume:
        if not settings.overwrite:
            raise ResultsExist(f"{store.path} has records of an earlier run: pass --resume to continue it, or "
                               "--overwrite to start again")
        store.clear()
    barrier(world)
    done = store.done() if settings.resume else {}
    mine = [s for s in shard(samples, world) if s.id not in done]
    prompts = settings_for(task.name, settings.style, settings.overrides)
    max_new = settings.max_new_tokens or task.max_new_tokens
    progress = Progress(f"{task.name}", len(mine), enabled=settings.progress and world.is_main)
    started = time.time()

    def on_done(job: Job, answer: str | None, error: str | None) -> None:
        store.append(_record(task, job, answer, error))
        progress.advance(failed=error is not None)

    try:
        if mine:
            get_backend().answer((Job(s, task.prompt(s, prompts), max_new) for s in mine), on_done)
    finally:
        store.close()
        progress.close()
    elapsed = time.time() - started
    barrier(world)
    if not world.is_main:
        return None
    order = {s.id: s.index for s in samples}
    records = [r for r in store.merge(order) if r["id"] in order]
    answered = sum(1 for r in records if r["id"] not in done)  # by every rank in this run
    return _finish(task, split, samples, records, files, settings, store, run, elapsed, answered)


def _record(task: Task, job: Job, answer: str | None, error: str | None) -> dict[str, Any]:
    s = job.sample
    record: dict[str, Any] = {"id": s.id, "index": s.index, "prompt": job.prompt.text}
    if job.prompt.prefix:
        record["prefix"] = job.prompt.prefix
    record.update(answer=answer, references=s.references, error=error)
    if error is None:
        scored = task.score(answer or "", s)
        record.update(score=scored.score, parsed=scored.parsed)
        if scored.flags:
            record["flags"] = scored.flags
        if scored.extra:
            record["extra"] = scored.extra
    else:
        record["score"] = None
    record["categories"] = {k: v for k, v in s.categories.items() if v is not None}
    return record


def _finish(task: Task, split: str, samples: list[Sample], records: list[dict[str, Any]], files: list[Path],
            settings: Settings, store: RecordStore, run: dict[str, Any], elapsed: float,
            answered: int) -> TaskResult:
    summary = task.summary(records)
    summary.seconds = elapsed
    result = TaskResult(task, split, summary, records, len(samples), error_counts(records))
    ok = [r for r in records if r.get("error") is None]
    if summary.scored == 0 and ok:
        submission = task.submission(ok)
        if submission is not None and settings.output is not None:
            result.submission = settings.output / f"{task.name}-{split}-submission.json"
            write_json(result.submission, submission)
    missing = len(samples) - len(records)
    if missing:
        summary.notes.append(f"{missing} selected samples have no record (interrupted rank?)")
    result.files = {"data": [str(f) for f in files], "records": str(store.path) if store.path else None}
    info = {**run, "prompt": {**run.get("prompt", {}), "pieces": _prompt_pieces(task, settings)},
            "generation": {**run.get("generation", {}), "max_new_tokens": settings.max_new_tokens
                           or task.max_new_tokens},
            "time": {**run.get("time", {}), "task_seconds": round(elapsed, 3),
                     "samples_answered": answered,
                     "samples_per_second": round(answered / elapsed, 4) if elapsed > 0 and answered else None}}
    if settings.output is not None:
        write_json(settings.output / f"{task.name}-{split}.json", results_json(result, info))
    result.files["results"] = str(settings.output / f"{task.name}-{split}.json") if settings.output else None
    return result


def _prompt_pieces(task: Task, settings: Settings) -> dict[str, str]:
    p = settings_for(task.name, settings.style, settings.overrides)
    return {k: v for k, v in vars(p).items() if v}
