"""A progress bar with the rate and the time left, on stderr.

On a terminal it redraws one line (at most five times a second); otherwise (a log file, a test) it writes a
line every 30 seconds and one at the end, so logs stay short. Under torchrun only rank 0 draws, for its own
shard (the ranks take equal shares, so its time left is the run's).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and total > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._drawn = 0.0

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        now = time.monotonic()
        if self.enabled and now - self._drawn >= (0.2 if self.tty else 30.0):
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        filled = int(WIDTH * self.done / self.total) if self.total else WIDTH
        bar = "=" * filled + (">" if filled < WIDTH else "") + " " * max(0, WIDTH - filled - 1)
        eta = clock(left) if left == left else "?"
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.label} [{bar}] {self.done}/{self.total} {rate:.2f} samples/s, {clock(elapsed)} elapsed, "
                f"ETA {eta}{failed}")

    def _draw(self, now: float) -> None:
        self._drawn = now
        text = self.line(now)
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self._draw(time.monotonic())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
