"""The per-sample results file: one JSON line per sample, appended as each answer comes, merged at the end.

Each process appends to its own part file (`<task>-<split>.part<rank>.jsonl`) with one `os.write` of a whole
line on a descriptor opened with O_APPEND: a line is in the kernel the moment the sample is scored, so a crash
or Ctrl-C loses only the samples still being generated, and every few seconds the file is fsynced. A line cut
short by a power loss is dropped when the file is read back (and trimmed before appending to it again).

`done()` reads the merged file and every part file, so `--resume` skips whatever any earlier run (with any number
of ranks) finished. `merge()` (rank 0, once every rank is done) writes all records, one per id in dataset order,
to `<task>-<split>.jsonl` through a temporary file and `os.replace`, then removes the parts.

Without an output folder (the demo's plain `idefics3 eval`) records are kept in memory only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FSYNC_EVERY_S = 2.0


class RecordStore:
    def __init__(self, folder: Path | None, stem: str, rank: int = 0) -> None:
        self.folder = folder
        self.stem = stem
        self.rank = rank
        self.memory: list[dict[str, Any]] = []
        self._fd: int | None = None
        self._synced = time.monotonic()

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / f"{self.stem}.jsonl"

    @property
    def part(self) -> Path | None:
        return None if self.folder is None else self.folder / f"{self.stem}.part{self.rank}.jsonl"

    def files(self) -> list[Path]:
        """The merged file and every rank's part file that exist."""
        if self.folder is None or not self.folder.is_dir():
            return []
        found = [self.path] if self.path.is_file() else []
        return found + sorted(self.folder.glob(f"{self.stem}.part*.jsonl"))

    def done(self) -> dict[str, dict[str, Any]]:
        """Every finished record by id (later files win, so a re-run sample replaces an older record)."""
        out: dict[str, dict[str, Any]] = {r["id"]: r for r in self.memory}
        for path in self.files():
            for record in read_jsonl(path):
                out[record["id"]] = record
        return out

    def clear(self) -> None:
        for path in self.files():
            path.unlink()
        self.memory.clear()

    # ---- appending ----------------------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        if self.folder is None:
            self.memory.append(record)
            return
        if self._fd is None:
            self._open()
        os.write(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        now = time.monotonic()
        if now - self._synced > FSYNC_EVERY_S:
            os.fsync(self._fd)
            self._synced = now

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.part
        if part.is_file():  # a line cut short by a crash: drop it before appending after it
            data = part.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(part, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    # ---- merging (rank 0, after every rank closed) ---------------------------------------------------------
    def merge(self, order: dict[str, int]) -> list[dict[str, Any]]:
        """All records, one per id, in dataset order (ids not in `order` last), written to the merged file."""
        records = sorted(self.done().values(), key=lambda r: (order.get(r["id"], len(order)), r.get("index", 0)))
        if self.folder is not None:
            parts = [p for p in self.files() if p != self.path]
            write_jsonl(self.path, records)
            for p in parts:
                p.unlink()
        return records


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    """The records of a JSONL file; a last line cut short is skipped, any other bad line is an error."""
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                continue
            raise ValueError(f"{path}:{i + 1} is not a JSON line ({err}); remove it or run with --overwrite") from err
        yield record


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with the records, atomically (a temporary file beside it, fsynced, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    """Replace `path` with a JSON document, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
