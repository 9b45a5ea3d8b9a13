"""Training conversations for the demo task: several questions about the same scene, one chat.

A single question per scene gives the model one or two answer tokens of signal for the price of encoding the
whole image; on a 2-core CPU that made training slow to converge. Here one scene carries up to `turns`
questions of different types, so each encoded image teaches several things:

    User:<image>How many squares are there?   Assistant: 2
    User:What colour is the triangle?         Assistant: blue
    User:Is the red square left of the blue triangle?   Assistant: no

Every question and answer follows the rules of `idefics3.demo.questions` (the held-out evaluation asks one
question per chat). An object is the subject of at most one colour or shape question in a chat, so an earlier
answer never gives a later one away ("What shape is the red one? circle" then "What colour is the circle?"),
and never after a position question has named it by colour and shape.

A one-scene chat ends with "Describe the scene." and an answer naming every object with its cell, in reading
order ("red circle at 1 2, blue square at 3 4, the word fox"): dense supervision of everything the encoder must
see, several tokens per object where a question gives one. It comes last, so it never answers a question.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from idefics3.demo.questions import EDGES, KINDS, SHAPES, Example, _plural, edge_question, extreme
from idefics3.demo.scenes import Scene, Shape, random_scene, render

# question, answer, the objects it names by colour and shape, and whether its answer is such a name
Question = tuple[str, str, tuple[Shape, ...], bool]


def scene_questions(scene: Scene, rng: random.Random) -> dict[str, list[Question]]:
    """Every question of each one-image type that has exactly one right answer for `scene`."""
    objs = scene.objects
    out: dict[str, list[Question]] = {k: [] for k in KINDS if k != "two"}
    for o in objs:
        if scene.count(o.shape) == 1:
            out["colour"].append((f"What colour is the {o.shape}?", o.colour, (o,), True))
        phrasing = rng.choice([f"What shape is the {o.colour} one?", f"What is the {o.colour} shape?"])
        out["shape"].append((phrasing, o.shape, (o,), True))
    if objs:
        out["count"].append(("How many shapes are there?", str(scene.count()), (), False))
    for shape in SHAPES:
        out["count"].append((f"How many {_plural(shape)} are there?", str(scene.count(shape)), (), False))
    for a in objs:
        for b in objs:
            if a is not b and a.col != b.col:
                side = rng.choice(["left", "right"])
                truth = a.col < b.col if side == "left" else a.col > b.col
                out["position"].append((f"Is the {a.colour} {a.shape} {side} of the {b.colour} {b.shape}?",
                                        "yes" if truth else "no", (a, b), False))
    for where in EDGES:
        o = extreme(objs, where)
        if o is not None:
            out["position"].append((edge_question(where), o.colour, (), False))
    if scene.word is not None:
        out["word"].append((rng.choice(["What word is written in the image?", "What does the text say?"]),
                            scene.word, (), False))
    return out


def _pick(rng: random.Random, pool: dict[str, list[Question]], weights: dict[str, float],
          turns: int) -> list[tuple[str, str, str]]:
    """Up to `turns` (kind, question, answer), kinds drawn by weight among those with questions left."""
    chosen: list[tuple[str, str, str]] = []
    named: set[int] = set()  # ids of objects whose colour and shape the chat has already said
    while len(chosen) < turns:
        kinds = [k for k, qs in pool.items() if qs]
        if not kinds:
            break
        kind = rng.choices(kinds, [weights.get(k, 1.0) for k in kinds])[0]
        question, answer, about, asks_binding = pool[kind].pop(rng.randrange(len(pool[kind])))
        if asks_binding and any(id(o) in named for o in about):
            continue
        named.update(id(o) for o in about)
        chosen.append((kind, question, answer))
    return chosen


def _two_image_questions(first: Scene, second: Scene) -> list[tuple[str, str, str]]:
    out = []
    for shape in (*SHAPES, None):
        a, b = first.count(shape), second.count(shape)
        if a != b:
            noun = "shapes" if shape is None else _plural(shape)
            out.append(("two", f"Which image has more {noun}?", "first" if a > b else "second"))
    return out


DESCRIBE = "Describe the scene."


def describe(scene: Scene) -> str:
    """Every object in reading order with its 1-based row and column, then the word if there is one."""
    parts = [f"{o.colour} {o.shape} at {o.row + 1} {o.col + 1}"
             for o in sorted(scene.objects, key=lambda o: (o.row, o.col))]
    if scene.word is not None:
        parts.append(f"the word {scene.word}")
    return ", ".join(parts) if parts else "nothing"


def conversation(rng: random.Random, weights: dict[str, float], turns: int, with_description: bool = True) -> Example:
    """One chat: one scene and up to `turns` questions (then its description, see the module docstring), or
    (with the weight of "two") two scenes and their "Which image has more ...?" questions. Example.kind is the
    first question's type."""
    total = sum(weights.values())
    if rng.random() < weights.get("two", 0.0) / total:
        while True:
            scenes = [random_scene(rng), random_scene(rng)]
            qa = _two_image_questions(*scenes)
            if qa:
                break
        rng.shuffle(qa)
        qa = qa[:turns]
    else:
        while True:
            scenes = [random_scene(rng, with_word=rng.random() < 0.4)]
            qa = _pick(rng, scene_questions(scenes[0], rng), weights, turns)
            if qa:
                break
        if with_description:
            qa.append(("describe", DESCRIBE, describe(scenes[0])))
    return Example(qa[0][0], "", "", [render(s) for s in scenes], turns=[(q, a) for _, q, a in qa])


def conversations(seed: int, count: int, weights: dict[str, float], turns: int) -> Iterator[Example]:
    """`count` training chats from `seed` (see `conversation`)."""
    rng = random.Random(seed)
    for _ in range(count):
        yield conversation(rng, weights, turns)


def position_conversations(seed: int, count: int, relational: int) -> Iterator[Example]:
    """The curriculum's position stage: scenes of 2 to 4 shapes, each chat one "What colour is the shape on the
    left/right?" (both, in random order, when `relational` is 0) and up to `relational` "Is the A left/right of
    the B?". The edge questions come first in the curriculum (relational 0): once the model finds the leftmost
    shape, it learns to compare two named ones (see recipe.py)."""
    rng = random.Random(seed)
    made = 0
    while made < count:
        scene = random_scene(rng, n_objects=rng.randint(2, 4), with_word=rng.random() < 0.3)
        pool = scene_questions(scene, rng)["position"]
        edges = [q for q in pool if q[0] in {edge_question(w) for w in ("left", "right")}]
        pairs = [q for q in pool if q[0].startswith("Is the ")]
        rng.shuffle(edges)
        rng.shuffle(pairs)
        qa = edges[:1] + pairs[:relational] if relational else edges
        if len(qa) < (2 if relational else 1):
            continue
        rng.shuffle(qa)
        made += 1
        yield Example("position", "", "", [render(scene)], turns=[(q, a) for q, a, _, _ in qa])


def warmup_examples(seed: int, count: int) -> Iterator[Example]:
    """The curriculum's first stage: one shape per scene, asked its colour or its shape in turn. A model
    trained from scratch learns to look here within a few hundred steps; straight on the full mix it can
    stay blind for thousands."""
    rng = random.Random(seed)
    for i in range(count):
        scene = random_scene(rng, n_objects=1, with_word=rng.random() < 0.3)
        o = scene.objects[0]
        if i % 2:
            yield Example("colour", f"What colour is the {o.shape}?", o.colour, [render(scene)], scene=scene)
        else:
            yield Example("shape", f"What shape is the {o.colour} one?", o.shape, [render(scene)], scene=scene)


def warmup_conversations(seed: int, count: int) -> Iterator[Example]:
    """The curriculum's first stage with descriptions: `warmup_examples` (one shape per scene, its
    colour or its shape asked), where every third chat asks for the scene's description instead (one turn
    each: after "What shape is the red one? square", "red square at 2 3" would be half copied)."""
    for i, ex in enumerate(warmup_examples(seed, count)):
        assert ex.scene is not None
        yield Example("describe", DESCRIBE, describe(ex.scene), ex.images) if i % 3 == 2 else ex
