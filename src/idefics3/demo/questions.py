"""Questions about synthetic scenes, with one short exact answer each, grouped into six types.

    colour    What colour is the circle?               -> red        (the shape is unique in the scene)
    shape     What shape is the blue one?              -> triangle
    count     How many shapes are there? / How many squares are there?   -> 3
    position  Is the red circle left of the blue square?  -> yes / What colour is the shape at the top? -> green
              What colour is the shape on the left?       -> blue
    word      What word is written in the image?       -> fox
    two       Which image has more circles?            -> first / second  (two images)

`make_example(rng, kind)` draws a scene (or two) fitting the question and returns an `Example`; answers are
one word, so exact match is a fair score. A seed fixes everything.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from .scenes import GRID, SHAPES, Scene, Shape, random_scene, render

KINDS = ("colour", "shape", "count", "position", "word", "two")


@dataclass
class Example:
    kind: str
    question: str
    answer: str
    images: list[Image.Image]
    turns: list[tuple[str, str]] | None = None  # several (question, answer) in one chat (training only)
    scene: Scene | None = None  # the drawn scene, where a caller keeps it (the training recipe's warm-up does)

    def messages(self, image_paths: list[str] | None = None) -> list[dict]:
        """The chat: the images (by path when given) before the first question, then the answer(s)."""
        parts = [{"type": "image", **({"image": p} if image_paths else {})} for p in (image_paths or self.images)]
        chat: list[dict] = []
        for i, (question, answer) in enumerate(self.turns or [(self.question, self.answer)]):
            chat.append({"role": "user", "content": [*(parts if i == 0 else []), {"type": "text", "text": question}]})
            chat.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return chat


def _plural(shape: str) -> str:
    return shape + "s"


def _colour(rng: random.Random) -> tuple[str, str, Scene]:
    while True:
        scene = random_scene(rng, with_word=rng.random() < 0.3)
        unique = [o for o in scene.objects if scene.count(o.shape) == 1]
        if unique:
            o = rng.choice(unique)
            return f"What colour is the {o.shape}?", o.colour, scene


def _shape(rng: random.Random) -> tuple[str, str, Scene]:
    scene = random_scene(rng, with_word=rng.random() < 0.3)
    o = rng.choice(scene.objects)
    return rng.choice([f"What shape is the {o.colour} one?", f"What is the {o.colour} shape?"]), o.shape, scene


def _count(rng: random.Random) -> tuple[str, str, Scene]:
    scene = random_scene(rng, with_word=rng.random() < 0.3)
    if rng.random() < 0.5:
        return "How many shapes are there?", str(scene.count()), scene
    shape = rng.choice(SHAPES)
    return f"How many {_plural(shape)} are there?", str(scene.count(shape)), scene


EDGES = {"top": ("row", min), "bottom": ("row", max), "left": ("col", min), "right": ("col", max)}


def edge_question(where: str) -> str:
    return f"What colour is the shape at the {where}?" if where in ("top", "bottom") else \
        f"What colour is the shape on the {where}?"


def extreme(objs: list[Shape], where: str) -> Shape | None:
    """The one object furthest towards `where` (a key of EDGES), or None when two or more tie."""
    axis, pick = EDGES[where]
    values = [getattr(o, axis) for o in objs]
    target = pick(values, default=0)
    return objs[values.index(target)] if len(objs) >= 2 and values.count(target) == 1 else None


def _position(rng: random.Random) -> tuple[str, str, Scene]:
    while True:
        scene = random_scene(rng, n_objects=rng.randint(2, 4), with_word=rng.random() < 0.3)
        objs = scene.objects
        if rng.random() < 0.5:
            a, b = rng.sample(objs, 2)
            if a.col == b.col:
                continue
            side = rng.choice(["left", "right"])
            truth = a.col < b.col if side == "left" else a.col > b.col
            return (f"Is the {a.colour} {a.shape} {side} of the {b.colour} {b.shape}?",
                    "yes" if truth else "no", scene)
        where = rng.choice(list(EDGES))
        o = extreme(objs, where)
        if o is None:
            continue
        return edge_question(where), o.colour, scene


def _word(rng: random.Random) -> tuple[str, str, Scene]:
    scene = random_scene(rng, n_objects=rng.randint(0, 3), with_word=True)
    assert scene.word is not None
    return rng.choice(["What word is written in the image?", "What does the text say?"]), scene.word, scene


def _two(rng: random.Random) -> tuple[str, str, list[Scene]]:
    shape = rng.choice([*SHAPES, None])
    while True:
        first, second = random_scene(rng), random_scene(rng)
        a, b = first.count(shape), second.count(shape)
        if a != b:
            break
    noun = "shapes" if shape is None else _plural(shape)
    return f"Which image has more {noun}?", "first" if a > b else "second", [first, second]


_MAKERS = {"colour": _colour, "shape": _shape, "count": _count, "position": _position, "word": _word}


def make_example(rng: random.Random, kind: str) -> Example:
    """One question of `kind` (one of KINDS) with its scene(s) rendered."""
    if kind == "two":
        question, answer, scenes = _two(rng)
        return Example(kind, question, answer, [render(s) for s in scenes])
    if kind not in _MAKERS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {', '.join(KINDS)}")
    question, answer, scene = _MAKERS[kind](rng)
    return Example(kind, question, answer, [render(scene)])


def examples(seed: int, count: int, weights: dict[str, float] | None = None) -> Iterator[Example]:
    """`count` examples from `seed`, one at a time; the kinds interleave in proportion to `weights`
    (equal shares when None)."""
    weights = weights or {k: 1.0 for k in KINDS}
    rng = random.Random(seed)
    kinds = list(weights)
    total = sum(weights.values())
    credit = {k: 0.0 for k in kinds}
    for _ in range(count):  # deterministic, smooth interleaving of the kinds
        for k in kinds:
            credit[k] += weights[k] / total
        kind = max(kinds, key=lambda k: credit[k])
        credit[kind] -= 1.0
        yield make_example(rng, kind)


__all__ = ["KINDS", "Example", "make_example", "examples", "GRID"]
