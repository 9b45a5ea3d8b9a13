"""Training data on disk -> conversations, by index, without loading whole files into memory.

Two layouts are read:
- JSONL, one `{"messages": [...]}` per line in the processor's chat format (content parts
  `{"type": "image", "image": "path/or/data-uri"}` and `{"type": "text", "text": ...}`); image paths are relative
  to the JSONL file. Opening a file records the byte offset of every line; a row is read by seeking to it.
- The Cauldron / Docmatix layout: parquet files whose rows hold `images` (a list of `{bytes, path}` structs or raw
  bytes) and `texts` (a list of `{user, assistant}` turns). pyarrow reads one row group at a time; rows become a
  conversation whose first user turn carries all the images, as the original training data was written.

A source knows its length and its row groups ("blocks"); `epoch_order` shuffles blocks and then rows within each
block, so a parquet reader keeps one row group in memory while the order still changes every epoch. Problems
with a single row raise `BadRow` with a short reason category; the stream (stream.py) counts and skips them.
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Conversation = list[dict[str, Any]]


class BadRow(ValueError):
    """A row that cannot become a training example; `reason` is a short category for the counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Source(Protocol):
    name: str

    def __len__(self) -> int: ...

    def read(self, index: int) -> Conversation: ...

    def blocks(self) -> list[tuple[int, int]]: ...


def _resolve_image(value: Any, base: Path) -> Any:
    """A relative image path becomes absolute (relative to the data file); a missing file raises BadRow."""
    if not isinstance(value, str) or value.startswith(("data:", "http://", "https://")):
        return value
    path = Path(value) if os.path.isabs(value) else base / value
    if path.is_file():
        return str(path)
    if os.path.isabs(value) or len(value) < 256 or "/" in value[:64] and "." in value[-8:]:
        raise BadRow("missing image", str(path))
    return value  # long strings are base64 payloads


def resolve_images(messages: Conversation, base: Path) -> Conversation:
    """Copy of the messages with image sources resolved against `base`."""
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            blocks = []
            for block in content:
                if isinstance(block, dict) and block.get("type") == "image":
                    block = dict(block)
                    for key in ("image", "url", "path"):
                        if key in block:
                            block[key] = _resolve_image(block[key], base)
                blocks.append(block)
            message = {**message, "content": blocks}
        out.append(message)
    return out


class JsonlSource:
    """Rows of a JSONL file, read by seeking to recorded line offsets (blank lines are not rows)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.base = self.path.resolve().parent
        self._offsets = array("q")
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)
        self._file: Any = None

    def __len__(self) -> int:
        return len(self._offsets)

    def blocks(self) -> list[tuple[int, int]]:
        return [(0, len(self))]

    def read(self, index: int) -> Conversation:
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(self._offsets[index])
        line = self._file.readline()
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRow("invalid json", f"line {index + 1}: {err}") from err
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise BadRow("bad format", f"line {index + 1} has no 'messages' list")
        return resolve_images(row["messages"], self.base)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}


def cauldron_messages(images: list[Any], texts: list[dict[str, Any]], base: Path) -> Conversation:
    """A Cauldron/Docmatix row as chat messages: all images open the first user turn."""
    if not isinstance(texts, list) or not texts:
        raise BadRow("no assistant turn", "empty 'texts'")
    messages: Conversation = []
    for turn, pair in enumerate(texts):
        if not isinstance(pair, dict) or "user" not in pair:
            raise BadRow("bad format", f"turn {turn} is not a {{user, assistant}} pair")
        content: list[dict[str, Any]] = []
        if turn == 0:
            for image in images or []:
                if isinstance(image, dict):
                    image = image.get("bytes") or (_resolve_image(image["path"], base) if image.get("path") else None)
                if image is None:
                    raise BadRow("missing image", "an image struct without bytes or path")
                content.append({"type": "image", "image": image})
        content.append({"type": "text", "text": str(pair.get("user") or "")})
        messages.append({"role": "user", "content": content})
        if pair.get("assistant") is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": str(pair["assistant"])}]})
    return messages


class ParquetSource:
    """Rows of one or more parquet files in the Cauldron layout; one row group is held in memory at a time."""

    def __init__(self, paths: list[Path]) -> None:
        import pyarrow.parquet as pq

        self.paths = paths
        self.name = str(paths[0].parent if len(paths) > 1 else paths[0])
        self._groups: list[tuple[int, int, int]] = []  # (file index, row group, first global row)
        total = 0
        for f, path in enumerate(paths):
            file = pq.ParquetFile(path)
            meta = file.metadata
            missing = {"images", "texts"} - set(file.schema_arrow.names)
            if missing:
                raise ValueError(f"{path} lacks the column(s) {sorted(missing)} of the Cauldron layout")
            for g in range(meta.num_row_groups):
                self._groups.append((f, g, total))
                total += meta.row_group(g).num_rows
        self._length = total
        self._starts = np.array([g[2] for g in self._groups], dtype=np.int64)
        self._cache: tuple[int, list[Any], list[Any]] | None = None

    def __len__(self) -> int:
        return self._length

    def blocks(self) -> list[tuple[int, int]]:
        ends = [*self._starts[1:].tolist(), self._length]
        return [(int(s), int(e)) for s, e in zip(self._starts, ends) if e > s]

    def _group(self, g: int) -> tuple[list[Any], list[Any]]:
        if self._cache is None or self._cache[0] != g:
            import pyarrow.parquet as pq

            f, rg, _ = self._groups[g]
            table = pq.ParquetFile(self.paths[f]).read_row_group(rg, columns=["images", "texts"])
            self._cache = (g, table.column("images").to_pylist(), table.column("texts").to_pylist())
        return self._cache[1], self._cache[2]

    def read(self, index: int) -> Conversation:
        g = int(np.searchsorted(self._starts, index, side="right")) - 1
        images, texts = self._group(g)
        row = index - int(self._starts[g])
        return cauldron_messages(images[row], texts[row], self.paths[self._groups[g][0]].resolve().parent)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}


def open_source(path: str | Path) -> Source:
    """A JSONL file, a parquet file, or a folder of parquet files (searched recursively, sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path}")
        return ParquetSource(files)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist")
    if path.suffix == ".parquet":
        return ParquetSource([path])
    return JsonlSource(path)


def epoch_order(source: Source, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The row order of one epoch: blocks shuffled, then rows within each block (the same for every rank)."""
    n = len(source)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    blocks = source.blocks()
    order = [np.arange(s, e, dtype=np.int64)[rng.permutation(e - s)] for s, e in
             (blocks[i] for i in rng.permutation(len(blocks)))]
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
