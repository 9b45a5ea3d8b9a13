"""The endless, resumable stream of training examples one process reads, with bad-row accounting.

All processes walk the same global order (epoch after epoch, reshuffled each epoch by `epoch_order`); process
`rank` of `world` takes slots rank, rank+world, rank+2·world, ... Its whole state is `position`, the number of
slots it has consumed, so a checkpoint that stores each rank's position resumes the data exactly. With one
process and a batch of B·world rows, the rows of a step are the same as those of `world` processes with B each.

A row that fails (`BadRow`) is skipped and counted by reason, once however many epochs or processes meet it
(rows are known by their index in the source); the first few reasons are logged. With `strict=True` the first bad
row raises instead. A source with no usable row at all raises rather than spin.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import BadRow, Conversation, Source, epoch_order
from .encode import Example

log = logging.getLogger(__name__)
REPORTED = 5


class DataError(ValueError):
    """Data that cannot be trained on at all (strict mode's first bad row, or no usable row)."""


@dataclass
class BadRowStats:
    """Bad rows by reason, each row counted once however many epochs meet it, and the first few messages.

    `rows` maps a row's index in the source to (reason, position): the stream position right after the row was
    first met, so that `until(position)` gives the stats as they stood at an earlier position (a checkpoint's).
    A row recorded without an index (or counts loaded from an older checkpoint) is counted but not deduplicated.
    The stream's reader thread records while the training loop snapshots, hence the lock."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    rows: dict[int, tuple[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, where: str, err: BadRow, row: int | None = None, position: int = 0) -> None:
        with self._lock:
            if row is not None:
                if row in self.rows:  # met again in a later epoch: already counted
                    return
                self.rows[row] = (err.reason, position)
            self.counts[err.reason] += 1
        if len(self.examples) < REPORTED:
            self.examples.append(f"{where}: {err}")
            log.warning("skipping bad row %s: %s", where, err)
            if len(self.examples) == REPORTED:
                log.warning("further bad rows are counted but not shown")

    def until(self, position: int) -> BadRowStats:
        """A copy holding only the rows first met at or before stream position `position`."""
        with self._lock:
            later = Counter(reason for reason, pos in self.rows.values() if pos > position)
            rows = {row: v for row, v in self.rows.items() if v[1] <= position} if later else dict(self.rows)
            return BadRowStats(self.counts - later, list(self.examples), rows)

    def state(self) -> dict[str, Any]:
        """A JSON-able form for checkpoints: {"rows": [[row, reason, position], ...], "unindexed": {reason: n}}."""
        with self._lock:
            indexed = Counter(reason for reason, _ in self.rows.values())
            return {"rows": [[row, reason, pos] for row, (reason, pos) in sorted(self.rows.items())],
                    "unindexed": dict(self.counts - indexed)}

    def merge(self, state: dict[str, Any]) -> None:
        """Add a `state()` (another rank's, or a checkpoint's; rows already here are not counted twice). A plain
        {reason: count} dict, as older checkpoints stored, is added as counts."""
        if "rows" not in state and "unindexed" not in state:
            state = {"unindexed": state}
        with self._lock:
            for row, reason, pos in state.get("rows", []):
                if row not in self.rows:
                    self.rows[row] = (reason, pos)
                    self.counts[reason] += 1
            self.counts.update(state.get("unindexed", {}))

    def summary(self) -> str:
        if not self.total:
            return "no bad rows"
        return f"{self.total} bad row{'s' if self.total > 1 else ''} skipped (" + \
            ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) + ")"


class ExampleStream:
    """Examples for one rank: `next()` encodes rows in order, skipping and counting bad ones."""

    def __init__(self, source: Source, encode: Callable[[Conversation], Example], seed: int, rank: int = 0,
                 world: int = 1, position: int = 0, shuffle: bool = True, strict: bool = False,
                 stats: BadRowStats | None = None) -> None:
        if len(source) == 0:
            raise DataError(f"{source.name} holds no rows")
        self.source, self.encode = source, encode
        self.seed, self.rank, self.world, self.shuffle, self.strict = seed, rank, world, shuffle, strict
        self.position = position
        self.stats = stats or BadRowStats()
        self._order: tuple[int, np.ndarray] | None = None

    def _row(self, slot: int) -> int:
        n = len(self.source)
        epoch, k = divmod(slot, n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.source, epoch, self.seed, self.shuffle))
        return int(self._order[1][k])

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (global slots / rows)."""
        return self.position * self.world / len(self.source)

    def next(self) -> Example:
        misses = 0
        while True:
            slot = self.position * self.world + self.rank
            self.position += 1
            row = self._row(slot)
            try:
                return self.encode(self.source.read(row))
            except BadRow as err:
                where = f"{self.source.name} row {row + 1}"
                if self.strict:
                    raise DataError(f"bad row {where}: {err} (strict mode; drop --strict to skip bad rows)") from err
                self.stats.record(where, err, row, self.position)
                misses += 1
                if misses > len(self.source):
                    raise DataError(f"no usable row in {self.source.name}: {self.stats.summary()}") from err


def iterate_once(source: Source, encode: Callable[[Conversation], Example], rank: int = 0, world: int = 1,
                 stats: BadRowStats | None = None) -> Iterator[Example]:
    """This rank's share of one unshuffled pass (evaluation); bad rows are counted in `stats` and skipped."""
    for row in range(rank, len(source), world):
        try:
            yield encode(source.read(row))
        except BadRow as err:
            if stats is not None:
                stats.record(f"{source.name} row {row + 1}", err, row)
