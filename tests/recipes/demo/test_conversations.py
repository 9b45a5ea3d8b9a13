"""Training chats of several questions about one scene: true answers, no answer given away, the data format."""

from __future__ import annotations

import json
import random
import re

from recipes.demo.conversations import (
    DESCRIBE,
    conversation,
    conversations,
    describe,
    position_conversations,
    scene_questions,
)
from recipes.demo.dataset import TRAIN_WEIGHTS, write_dataset

from idefics3.demo.scenes import COLOURS, SHAPES, Scene, Shape, random_scene


def _object(scene, colour=None, shape=None):
    found = [o for o in scene.objects if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]
    assert len(found) == 1, (colour, shape, scene.objects)
    return found[0]


def test_every_scene_question_has_the_true_answer():
    rng = random.Random(5)
    seen = set()
    for _ in range(300):
        scene = random_scene(rng, with_word=rng.random() < 0.5)
        for kind, qs in scene_questions(scene, rng).items():
            for question, answer, _, _ in qs:
                seen.add(kind)
                if m := re.fullmatch(r"What colour is the (\w+)\?", question):
                    assert answer == _object(scene, shape=m[1]).colour
                elif m := re.fullmatch(r"What (?:shape is the|is the) (\w+) (?:one|shape)\?", question):
                    assert answer == _object(scene, colour=m[1]).shape
                elif m := re.fullmatch(r"How many (\w+) are there\?", question):
                    want = len(scene.objects) if m[1] == "shapes" else scene.count(m[1][:-1])
                    assert answer == str(want)
                elif m := re.fullmatch(r"Is the (\w+) (\w+) (left|right) of the (\w+) (\w+)\?", question):
                    a, b = _object(scene, m[1], m[2]), _object(scene, m[4], m[5])
                    assert a.col != b.col
                    assert answer == ("yes" if (a.col < b.col) == (m[3] == "left") else "no")
                elif m := re.fullmatch(r"What colour is the shape (?:at|on) the (top|bottom|left|right)\?", question):
                    seen.add(m[1])
                    axis = "row" if m[1] in ("top", "bottom") else "col"
                    values = [getattr(o, axis) for o in scene.objects]
                    target = min(values) if m[1] in ("top", "left") else max(values)
                    assert values.count(target) == 1 and answer == scene.objects[values.index(target)].colour
                else:
                    assert kind == "word" and answer == scene.word
    assert seen == {"colour", "shape", "count", "position", "word", "top", "bottom", "left", "right"}


def test_a_chat_never_names_an_object_before_asking_its_colour_or_shape():
    for ex in conversations(3, 400, TRAIN_WEIGHTS, turns=4):
        questions = ex.turns
        if len(ex.images) == 1:  # one scene: the questions, then its description, last
            assert questions[-1][0] == DESCRIBE and DESCRIBE not in [q for q, _ in questions[:-1]]
            questions = questions[:-1]
        assert 1 <= len(questions) <= 4
        assert len({q for q, _ in questions}) == len(questions)  # no question twice
        named: set[str] = set()  # "colour shape" pairs said so far
        for question, answer in questions:
            if m := re.fullmatch(r"What colour is the (\w+)\?", question):
                pair = f"{answer} {m[1]}"
            elif m := re.fullmatch(r"What (?:shape is the|is the) (\w+) (?:one|shape)\?", question):
                pair = f"{m[1]} {answer}"
            else:
                for colour, shape in re.findall(r"the (\w+) (\w+) ", question + " "):
                    if colour in COLOURS and shape in SHAPES:
                        named.add(f"{colour} {shape}")
                continue
            assert pair not in named, ex.turns
            named.add(pair)


def test_two_image_chats_ask_only_which_has_more():
    exs = [conversation(random.Random(i), {"two": 1.0}, turns=4) for i in range(50)]
    for ex in exs:
        assert len(ex.images) == 2 and ex.kind == "two"
        assert all(q.startswith("Which image has more ") and a in ("first", "second") for q, a in ex.turns)


def test_multi_turn_dataset_rows(tmp_path):
    path = write_dataset(tmp_path, seed=2, count=20, turns=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert any(len(r["messages"]) > 2 for r in rows)
    for row in rows:
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        images = [p for m in msgs for p in m["content"] if p["type"] == "image"]
        assert images and all(p in msgs[0]["content"] for p in images)  # images only before the first question
        assert all((tmp_path / p["image"]).is_file() for p in images)


def test_description_names_every_object_in_reading_order():
    scene = Scene([Shape("square", "blue", "small", 2, 0), Shape("circle", "red", "large", 0, 3),
                   Shape("triangle", "green", "small", 0, 1)], word="fox", word_cell=(3, 1))
    assert describe(scene) == "green triangle at 1 2, red circle at 1 4, blue square at 3 1, the word fox"
    assert describe(Scene([])) == "nothing"
    plain = conversation(random.Random(0), {"colour": 1.0}, turns=2, with_description=False)
    assert DESCRIBE not in [q for q, _ in plain.turns]


def test_position_stage_chats_ask_edges_then_comparisons():
    edge = re.compile(r"What colour is the shape on the (left|right)\?")
    for relational in (0, 3):
        chats = list(position_conversations(9, 60, relational))
        assert len(chats) == 60
        for ex in chats:
            kinds = ["edge" if edge.fullmatch(q) else "compare" for q, _ in ex.turns]
            assert all(re.fullmatch(r"Is the \w+ \w+ (left|right) of the \w+ \w+\?", q)
                       for (q, _), k in zip(ex.turns, kinds) if k == "compare")
            if relational == 0:
                assert set(kinds) == {"edge"} and 1 <= len(kinds) <= 2
            else:
                assert kinds.count("edge") <= 1 and 1 <= kinds.count("compare") <= relational and len(kinds) >= 2
    a = [ex.turns for ex in position_conversations(4, 10, 3)]
    b = [ex.turns for ex in position_conversations(5, 10, 3)]
    assert a == [ex.turns for ex in position_conversations(4, 10, 3)] != b
