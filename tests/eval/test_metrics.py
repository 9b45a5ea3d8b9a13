"""Every scoring rule against the vectors the upstream implementations produce (tests/eval/vectors.py)."""

from __future__ import annotations

import random

import pytest

from eval.vectors import (
    ANLS,
    MATHVISTA_CHOICE,
    MATHVISTA_CHOICES,
    MATHVISTA_OTHER,
    MMMU_CHOICE,
    MMMU_OPEN,
    MMMU_OPTIONS,
    MMMU_RANDOM_WITH_SEED_42,
    MMSTAR,
    MMSTAR_CHOICES,
    NORMALISE,
    TEXTVQA,
)
from idefics3.eval.metrics.anls import anls
from idefics3.eval.metrics.choice import can_infer, mmstar_hit
from idefics3.eval.metrics.mathvista import Problem, normalize_extracted_answer
from idefics3.eval.metrics.mmmu import open_correct, parse_multiple_choice, parse_open
from idefics3.eval.metrics.vqa import normalise_answer, vqa_accuracy


@pytest.mark.parametrize("text, expected", NORMALISE)
def test_evalai_normalisation(text, expected):
    assert normalise_answer(text) == expected


@pytest.mark.parametrize("prediction, references, expected", TEXTVQA)
def test_textvqa_accuracy(prediction, references, expected):
    assert vqa_accuracy(prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, references, expected", ANLS)
def test_anls(prediction, references, expected):
    assert round(anls(prediction, references), 4) == expected


@pytest.mark.parametrize("response, expected", MMMU_CHOICE)
def test_mmmu_multiple_choice(response, expected):
    letter, drawn = parse_multiple_choice(response, MMMU_OPTIONS)
    assert drawn == (expected is None)
    assert letter == (expected or MMMU_RANDOM_WITH_SEED_42)


def test_mmmu_random_pick_is_the_first_draw_of_seed_42():
    assert random.Random(42).choice(["A", "B", "C", "D"]) == MMMU_RANDOM_WITH_SEED_42
    assert [parse_multiple_choice("b", MMMU_OPTIONS)[0] for _ in range(3)] == [MMMU_RANDOM_WITH_SEED_42] * 3


@pytest.mark.parametrize("response, gold, expected", MMMU_OPEN)
def test_mmmu_open(response, gold, expected):
    assert open_correct(parse_open(response), gold) is expected


@pytest.mark.parametrize("extraction, expected", MATHVISTA_CHOICE)
def test_mathvista_normalise_choice(extraction, expected):
    problem = Problem("multi_choice", "text", tuple(MATHVISTA_CHOICES))
    assert normalize_extracted_answer(extraction, problem) == expected


@pytest.mark.parametrize("extraction, answer_type, precision, expected", MATHVISTA_OTHER)
def test_mathvista_normalise_numbers_and_lists(extraction, answer_type, precision, expected):
    problem = Problem("free_form", answer_type, (), precision)
    assert normalize_extracted_answer(extraction, problem) == expected


@pytest.mark.parametrize("response, official, _lmms, vlmevalkit", MMSTAR)
def test_mmstar_official_and_can_infer(response, official, _lmms, vlmevalkit):
    assert mmstar_hit(response, "B") is bool(official)
    assert can_infer(response, MMSTAR_CHOICES) == vlmevalkit
