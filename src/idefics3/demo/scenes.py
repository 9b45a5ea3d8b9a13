"""Synthetic scenes for the demo task: simple shapes in several colours, sizes and places, and maybe a word.

A scene is a 4x4 grid of 32-px cells on a 128x128 canvas (one 32-px tile per cell for the demo model, so the
processor splits it into 4x4 tiles plus the global image). Each object sits centred in its own cell; every
object in a scene has its own colour, so "the red one" always names one object. A word, when present, takes
two horizontally adjacent cells and is drawn in black with Pillow's default font, centred on them.

Centred, because a cell is exactly 2x2 of the demo encoder's 16-px patches (and one image token after the pixel
shuffle), so a centred shape always looks the same to the encoder; drawn large (half-widths 10 and 14 of a
32-px cell), so that a circle and a square differ in more than a few pixels per patch. The encoder, trained
from scratch, learnt neither jittered nor small shapes in the recipe's budget (recipes/demo/NOTES.md in the
repository has the measurements).
The background is mid grey (see BACKGROUND). Everything comes from a `random.Random`: a seed fixes the scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

CANVAS = 128
GRID = 4
CELL = CANVAS // GRID
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 225),
    "yellow": (235, 200, 20), "purple": (150, 40, 190)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 10, "large": 14}  # half-width in pixels (see the module docstring)
WORDS = ("cat", "dog", "sun", "car", "hat", "cup", "pen", "key", "bus", "fox", "owl", "bee", "egg", "map",
         "box", "jam")
FONT_SIZE = 22
MAX_OBJECTS = 5
# Mid grey normalises to ~0 (mean = std = 0.5): a background patch then adds nothing but its bias, and a
# shape's colour stands out in full (on white a model trained from scratch learnt colours far later).
BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class Shape:
    """One object: what it is and the grid cell it occupies (row 0 is the top, col 0 the left)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int


@dataclass
class Scene:
    objects: list[Shape]
    word: str | None = None
    word_cell: tuple[int, int] | None = None  # (row, first col) of the two cells the word takes

    def count(self, shape: str | None = None) -> int:
        return sum(1 for o in self.objects if shape is None or o.shape == shape)


def random_scene(rng: random.Random, n_objects: int | None = None, with_word: bool = False,
                 shapes: tuple[str, ...] = SHAPES) -> Scene:
    """A scene of `n_objects` (1..5 when None) shapes in distinct colours and free cells, maybe a word."""
    n = rng.randint(1, MAX_OBJECTS) if n_objects is None else n_objects
    free = [(r, c) for r in range(GRID) for c in range(GRID)]
    word = word_cell = None
    if with_word:
        word_cell = (rng.randrange(GRID), rng.randrange(GRID - 1))
        word = rng.choice(WORDS)
        free = [cell for cell in free if not (cell[0] == word_cell[0] and cell[1] in (word_cell[1], word_cell[1] + 1))]
    cells = rng.sample(free, n)
    colours = rng.sample(list(COLOURS), n)
    objects = [Shape(rng.choice(shapes), colour, rng.choice(list(SIZES)), r, c)
               for (r, c), colour in zip(cells, colours)]
    return Scene(objects, word, word_cell)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render(scene: Scene) -> Image.Image:
    """Draw the scene on a grey 128x128 canvas."""
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = o.col * CELL + CELL // 2, o.row * CELL + CELL // 2
        h = SIZES[o.size]
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - h + 1, cy - h + 1, cx + h - 1, cy + h - 1), fill=fill)
        else:
            draw.polygon([(cx - h, cy + h), (cx, cy - h), (cx + h, cy + h)], fill=fill)
    if scene.word is not None and scene.word_cell is not None:
        r, c = scene.word_cell
        cx, cy = (c + 1) * CELL, r * CELL + CELL // 2
        left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=_font())
        draw.text((cx - (right + left) / 2, cy - (bottom + top) / 2), scene.word, fill="black", font=_font())
    return img
