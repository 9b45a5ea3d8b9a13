"""Cases worked by hand from the official implementations' rules: punctuation, articles, number words, several
matches, empty and unparseable answers, and the rules that have no upstream vectors (ChartQA, OCRBench,
exact match, MathVista's extraction)."""

from __future__ import annotations

import pytest

from idefics3.eval.metrics.anls import anls, levenshtein
from idefics3.eval.metrics.chartqa import relaxed_correctness
from idefics3.eval.metrics.choice import can_infer_option, exact_match, mmstar_hit
from idefics3.eval.metrics.mathvista import Problem, extract, is_correct, normalize_extracted_answer
from idefics3.eval.metrics.mmmu import gold_answers, open_correct, parse_multiple_choice, parse_open, parse_options
from idefics3.eval.metrics.ocrbench import ocrbench_hit
from idefics3.eval.metrics.vqa import normalise_answer, vqa_accuracy


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("ab", "ab") == 0


def test_anls_takes_the_best_reference_and_refuses_none():
    assert anls("Paris", ["London", "paris"]) == 1.0
    assert anls("", [""]) == 1.0  # both empty: NL 0
    with pytest.raises(ValueError):
        anls("x", [])


@pytest.mark.parametrize("text, expected", [
    ("An apple", "apple"),                  # article dropped
    ("THE END!", "end"),                    # "!" touching nothing becomes a space, then stripped
    ("seven eleven", "7 eleven"),           # only none..ten are number words
    ("Hello!world", "hello world"),         # punctuation between words: a space
    ("(tea) time", "tea time"),             # ")" touches a space: deleted; "(" does not: a space
    ("1,5 and x-y", "15 and x y"),          # commas go first, so the digit,digit rule never fires
    ("end.", "end"), ("v1.2", "v1.2"),      # a period before a digit stays
    ("  multiple   spaces\tand\ttabs\n", "multiple spaces and tabs"),
    ("isnt", "isn't"), ("", ""),
])
def test_evalai_normalisation_by_hand(text, expected):
    assert normalise_answer(text) == expected


def test_vqa_accuracy_partial_and_empty():
    assert vqa_accuracy("", ["a"] * 10) == pytest.approx(1.0)   # "" vs "a" -> article dropped: "" == ""
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("cat", ["cat"] * 2) == pytest.approx(1 / 3)  # fewer references: each subset has one
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


def test_mmmu_multiple_choice_by_hand():
    options = ["red", "green", "blue"]
    assert parse_multiple_choice("(A) or maybe (C)", options) == ("C", False)      # brackets, the last wins
    assert parse_multiple_choice("(B) but B and A", options) == ("B", False)       # brackets beat bare letters
    assert parse_multiple_choice("I would say that it is green.", options) == ("B", False)  # > 5 words: text
    assert parse_multiple_choice("green", options)[1] is True  # one word: the text rule does not apply
    assert parse_multiple_choice("", options)[1] is True
    # several texts: the one mentioned last
    assert parse_multiple_choice("it looks red at first but then blue", options) == ("C", False)


def test_mmmu_options_and_gold_parsing():
    assert parse_options("['1', 'two']") == ["1", "two"] and parse_options(["a"]) == ["a"] and parse_options(None) == []
    with pytest.raises(ValueError):
        parse_options("'not a list'")
    assert gold_answers("['0.5', '1/2']") == ["0.5", "1/2"] and gold_answers("B") == ["B"]
    assert open_correct(parse_open("It is 0.5"), "['0.5', '1/2']")


def test_mmmu_open_by_hand():
    assert parse_open("") == [""]
    assert open_correct(parse_open("Therefore the result is 2.5e3 joules"), "2500")
    assert not open_correct(parse_open("I cannot tell"), "7")
    assert open_correct(parse_open("-3"), "-3.0")


def test_mathvista_extraction_steps():
    mc = Problem("multi_choice", "text", ("3/11", "8/11", "6/11", "3/5"), answer="8/11")
    assert extract("8/11", mc).text == "8/11" and not extract("8/11", mc).fallback   # a choice as it is
    assert extract("", mc).text == "" and not extract("", mc).fallback
    assert extract('The answer is "B".', mc).text == "B" and not extract('The answer is "B".', mc).fallback
    for response, letter in [("B", "B"), ("(B) 8/11", "B"), ("b.", "B"), ("The answer is C.", "C"),
                             ("Answer: (D)", "D"), ("I pick option (A) here", "A")]:
        got = extract(response, mc)
        assert got.fallback and not got.unparsed and got.text == letter, response
    odd = extract("no idea at all", mc)
    assert odd.fallback and odd.unparsed
    assert normalize_extracted_answer(odd.text, mc) in mc.choices  # nearest choice, as upstream

    integer = Problem("free_form", "integer", answer="14")
    assert extract("14", integer).text == "14" and not extract("14", integer).fallback
    got = extract("There are 14 apples.", integer)
    assert got.fallback and got.text == "14" and is_correct(normalize_extracted_answer(got.text, integer), "14")
    assert extract("1,024 in total", integer).text == "1024"
    none = extract("many", integer)
    assert none.unparsed and normalize_extracted_answer(none.text, integer) is None
    assert not is_correct(None, "14")

    floating = Problem("free_form", "float", precision=1, answer="0.6")
    assert extract("0.6", floating).text == "0.6" and not extract("0.6", floating).fallback
    assert normalize_extracted_answer(extract("about 0.61", floating).text, floating) == "0.6"

    listed = Problem("free_form", "list", answer="[2007, 2008]")
    got = extract("Between [2007, 2008].", listed)
    assert got.fallback and is_correct(normalize_extracted_answer(got.text, listed), "[2007, 2008]")


@pytest.mark.parametrize("prediction, target, expected", [
    ("10", "10", True), ("10.5", "10", True), ("10.6", "10", False), ("9.5", "10", True),  # 5% inclusive
    ("50%", "0.5", True), ("0.5", "50%", True), ("0", "0", True), ("0.01", "0", False),  # target 0: exact
    ("Yes", "yes", True), ("1,000", "1000", False),  # not a number: string equality
    ("", "3", False),
])
def test_chartqa_relaxed(prediction, target, expected):
    assert relaxed_correctness(prediction, target) is expected


def test_ocrbench_rules():
    assert ocrbench_hit("The word is HELLO.", ["hello"])
    assert not ocrbench_hit("hell", ["hello"])
    assert ocrbench_hit("x ^ { 2 }", ["x^{2}"], dataset="HME100k")
    assert ocrbench_hit("a\nb", "a b")
    assert not ocrbench_hit("", ["x"])


def test_exact_match_and_mmstar_edges():
    assert exact_match("A.", "A") and exact_match("(a)", "A") and not exact_match("A B", "A")
    assert not exact_match(" A", "A")  # whitespace is not ignored (answers are stripped before scoring)
    assert not mmstar_hit("(", "B") and not mmstar_hit("option", "B") and mmstar_hit("  b) dog", "B")
    assert can_infer_option("A B C", {"A": "x", "B": "y"}) is False   # two letters: undecided
    assert can_infer_option("Cannot determine the answer", {"A": "x"}) == "Z"
