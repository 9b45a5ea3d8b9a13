"""The synthetic task: deterministic from a seed, answers true to the scene."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from idefics3.demo.questions import KINDS, examples, make_example
from idefics3.demo.scenes import CANVAS, COLOURS, SHAPES, WORDS, random_scene, render


def test_same_seed_same_examples_other_seed_other_examples():
    a = [(e.question, e.answer, [im.tobytes() for im in e.images]) for e in examples(3, 24)]
    b = [(e.question, e.answer, [im.tobytes() for im in e.images]) for e in examples(3, 24)]
    c = [(e.question, e.answer, [im.tobytes() for im in e.images]) for e in examples(4, 24)]
    assert a == b and a != c


def test_equal_shares_and_answer_vocabulary():
    exs = list(examples(11, 120))
    assert Counter(e.kind for e in exs) == {k: 20 for k in KINDS}
    allowed = {"colour": set(COLOURS), "shape": set(SHAPES), "count": set("012345"),
               "position": {"yes", "no", *COLOURS}, "word": set(WORDS), "two": {"first", "second"}}
    for e in exs:
        assert e.answer in allowed[e.kind], (e.kind, e.question, e.answer)
        assert len(e.images) == (2 if e.kind == "two" else 1)
        assert all(im.size == (CANVAS, CANVAS) for im in e.images)  # 4x4 tiles of 32 px + the global image


def test_scene_rules_and_rendering():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng, with_word=True)
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells)
        assert len({o.colour for o in scene.objects}) == len(scene.objects)  # "the red one" is one object
        r, c = scene.word_cell
        assert (r, c) not in cells and (r, c + 1) not in cells
    img = render(scene)
    pixels = {colour for _, colour in img.getcolors(maxcolors=CANVAS * CANVAS)}
    assert any(max(p) < 60 for p in pixels)  # the word is drawn in black
    assert all(COLOURS[o.colour] in pixels for o in scene.objects)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown question kind"):
        make_example(random.Random(0), "smell")
