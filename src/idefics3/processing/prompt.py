"""Prompt expansion: each `<image>` placeholder becomes the tile markers and image tokens of its image.

With F = `<fake_token_around_image>`, G = `<global-img>`, I = `<image>` repeated S = `image_seq_len` times and
`<row_r_col_c>` 1-based markers, an image cut into rows x cols tiles expands (in reading order) to

    for each row r:  (F <row_r_col_c> I*S for each column c) then "\\n"
    then             "\\n" F G I*S F                      (the global image)

and an image kept whole (rows = cols = 0) expands to `F G I*S F`. Tiles have no closing F: the next F
separates them. Images are matched to placeholders in order, sample by sample.

Decoding goes the other way: `collapse_image_markers` turns every run of `<global-img>` / `<row_r_col_c>`
markers (with their newlines) back into a single `<image>`, as transformers 4.x's processor did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Runs of tile/global markers with their surrounding newlines (transformers 4.x's decode-side pattern).
_MARKER_RUN = re.compile(r"(\n?<global-img>\n?|<row_\d+_col_\d+>\n?)+")


@dataclass(frozen=True)
class ImageTokens:
    """The strings an expansion is made of."""

    image: str = "<image>"
    fake_image: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"


def image_prompt(rows: int, cols: int, image_seq_len: int, tokens: ImageTokens = ImageTokens()) -> str:
    """The text that stands for one image cut into a rows x cols grid (0 x 0: a single frame)."""
    image_run = tokens.image * image_seq_len
    global_block = f"{tokens.fake_image}{tokens.global_image}{image_run}{tokens.fake_image}"
    if rows == 0 and cols == 0:
        return global_block
    lines = [
        "".join(f"{tokens.fake_image}<row_{r + 1}_col_{c + 1}>{image_run}" for c in range(cols)) + "\n"
        for r in range(rows)
    ]
    return "".join(lines) + "\n" + global_block


def count_placeholders(texts: list[str], tokens: ImageTokens = ImageTokens()) -> list[int]:
    """Number of `<image>` placeholders in each sample."""
    return [text.count(tokens.image) for text in texts]


def expand_prompts(texts: list[str], grids: list[list[tuple[int, int]]], image_seq_len: int,
                   tokens: ImageTokens = ImageTokens()) -> list[str]:
    """Replace the k-th `<image>` of sample b by the expansion of `grids[b][k]` (its (rows, cols))."""
    counts = count_placeholders(texts, tokens)
    if counts != [len(sample) for sample in grids]:
        raise ValueError(f"the prompts hold {counts} {tokens.image} placeholders per sample but "
                         f"{[len(sample) for sample in grids]} images per sample were given")
    expanded = []
    for text, sample in zip(texts, grids):
        pieces = text.split(tokens.image)
        out = [pieces[0]]
        for (rows, cols), piece in zip(sample, pieces[1:]):
            out.append(image_prompt(rows, cols, image_seq_len, tokens))
            out.append(piece)
        expanded.append("".join(out))
    return expanded


def collapse_image_markers(text: str, image_token: str = "<image>") -> str:
    """Undo the marker part of an expansion in decoded text: each run of markers becomes one `image_token`."""
    return _MARKER_RUN.sub(image_token, text)
