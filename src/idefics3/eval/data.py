"""Reading a split: its parquet files one row group at a time, images left encoded until a sample runs.

`read_rows` yields each row's plain columns as Python values and, for each image column, an `ImageRef`: the
address of the cell (file, row group, row, column). Only the plain columns are read while listing a split, so a
DocVQA validation split (5,349 questions, several GB of page scans) is listed in well under a second and holds
no image bytes. `ImageRef.load` reads the image column of its row group when first asked (the last few row
groups' columns are kept, since neighbouring samples are asked together), then decodes that one cell with
Pillow. Cells are Hugging Face `Image` structs {bytes, path}: the bytes, else the path relative to the file.

Every image is converted to RGB, as lmms-eval's `doc_to_visual` does. A cell that cannot be read or decoded
raises `ImageError`, which the runner records against that sample alone.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .layouts import DataError

_KEEP_ROW_GROUPS = 4


class ImageError(ValueError):
    """One image that cannot be read or decoded."""


class _ImageColumns:
    """The image columns of the most recently used row groups (thread-safe; one per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: OrderedDict[tuple[Path, int], Any] = OrderedDict()

    def cell(self, file: Path, row_group: int, row: int, column: str) -> Any:
        import pyarrow.parquet as pq

        key = (file, row_group)
        with self._lock:
            table = self._tables.get(key)
            if table is None or column not in table.column_names:
                names = [column] if table is None else [*table.column_names, column]
                table = pq.ParquetFile(file).read_row_group(row_group, columns=names)
                self._tables[key] = table
                while len(self._tables) > _KEEP_ROW_GROUPS:
                    self._tables.popitem(last=False)
            self._tables.move_to_end(key)
            return table.column(column)[row].as_py()


_COLUMNS = _ImageColumns()


@dataclass(frozen=True)
class ImageRef:
    """One image cell of a parquet file, read and decoded only when `load` is called."""

    file: Path
    row_group: int
    row: int
    column: str

    def raw(self) -> bytes:
        """The encoded image (from the cell's bytes, or the file its path names)."""
        try:
            cell = _COLUMNS.cell(self.file, self.row_group, self.row, self.column)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for a damaged file
            raise ImageError(f"cannot read {self.column} of row {self.row} in {self.file.name}: {err}") from err
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
        else:
            data, path = (cell, None) if isinstance(cell, (bytes, bytearray)) else (None, cell)
        if data:
            return bytes(data)
        if path:
            target = Path(path) if Path(path).is_absolute() else self.file.parent / path
            try:
                return target.read_bytes()
            except OSError as err:
                raise ImageError(f"{self.column}: cannot read {str(target)!r}: {err.strerror}") from err
        raise ImageError(f"{self.column} of row {self.row} in {self.file.name} is empty")

    def load(self) -> tuple[Image.Image, str]:
        """(the image in RGB, a digest of its encoded bytes: equal bytes give equal digests)."""
        data = self.raw()
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        return decode(data, f"{self.column} of row {self.row} in {self.file.name}"), digest


@dataclass(frozen=True)
class MemoryImage:
    """An image already in memory (the built-in demo task draws its scenes)."""

    image: Image.Image

    def load(self) -> tuple[Image.Image, str]:
        img = self.image.convert("RGB")
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{img.size}".encode())
        h.update(img.tobytes())
        return img, h.hexdigest()


def decode(data: bytes, what: str) -> Image.Image:
    """Decode encoded image bytes to RGB, or raise ImageError naming `what`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a bad image
        raise ImageError(f"cannot decode {what}: {type(err).__name__}: {err}") from err


def check_columns(file: Path, names: Sequence[str], required: Sequence[str], task: str, layout: str) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{file} has no column(s) {', '.join(missing)}: {task} reads {', '.join(required)} "
                        f"(the layout of {layout}); its columns are {', '.join(names)}")


def read_rows(files: Sequence[Path], columns: Sequence[str], image_columns: Sequence[str], task: str,
              layout: str, optional: Sequence[str] = ()) -> Iterator[tuple[dict[str, Any], dict[str, ImageRef]]]:
    """Each row of the files, in order: (plain columns asked that the file has, {image column: ImageRef}).
    `columns` and `image_columns` must exist (a DataError names what is missing); `optional` ones are read when
    present."""
    import pyarrow.parquet as pq

    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as err:  # noqa: BLE001 - not a parquet file, truncated, ...
            raise DataError(f"cannot read {file}: {err}") from err
        names = parquet.schema_arrow.names
        check_columns(file, names, [*columns, *image_columns], task, layout)
        plain = [*columns, *(c for c in optional if c in names and c not in columns)]
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=plain)
            rows = table.to_pylist()
            for i, row in enumerate(rows):
                yield row, {c: ImageRef(file, group, i, c) for c in image_columns}
