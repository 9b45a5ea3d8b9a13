"""MathVista's scoring without an LLM judge: the official extraction steps that need no model, a documented
rule-based fallback for what the official pipeline would send to GPT, and the official normalisation.

Official (MathVista `evaluation/extract_answer.py` + `calculate_score.py`, as lmms-eval runs them):

1. an empty response extracts "";
2. a multiple-choice response that *is* one of the choices is used as it is;
3. for integer / float answers, int(response) / float(response) of the whole response;
4. the quick regex `The answer is "(...)".`;
5. otherwise GPT extracts the answer from few-shot demos.

Step 5 is replaced by rules (`fallback`): "answer is X" / "Answer: X" tails; for multiple choice a leading
option letter ("B", "(B) 8/11", "B. 8/11"), else the last "(X)", else the last standalone option letter; for
numbers the last number written; for lists the last [...]. Answers that reach step 5 are flagged
`fallback=True`, and those no rule could read `unparsed=True`: both shares are reported beside the score.

`normalize_extracted_answer` (official): multiple choice maps "(X)" to X, a letter to its choice's text, and
anything else to the nearest choice by Levenshtein distance (the first one on ties); integer answers become
str(int(float(x))), floats str(round(float(x), precision)), lists str(x); a failed conversion gives None.
An answer is correct when str(prediction).strip() == str(answer).strip().
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .anls import levenshtein

MULTI_CHOICE = "multi_choice"
_QUICK = re.compile(r'The answer is "(.*)"\.')
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])(?:[.:)](?:\s|$)|$))")
_BRACKETED = re.compile(r"\(([A-Za-z])\)")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_LIST = re.compile(r"\[[^\[\]]*\]")


@dataclass(frozen=True)
class Problem:
    """What scoring needs of one MathVista item (its dataset columns)."""

    question_type: str             # "multi_choice" / "free_form"
    answer_type: str               # "text" / "integer" / "float" / "list"
    choices: tuple[str, ...] = ()
    precision: int = 0
    answer: str | None = None

    @property
    def multiple_choice(self) -> bool:
        return self.question_type == MULTI_CHOICE


@dataclass(frozen=True)
class Extraction:
    text: str
    fallback: bool = False   # the official pipeline would have asked GPT here
    unparsed: bool = False   # and no rule could read it either


def official_extract(response: str, problem: Problem) -> str | None:
    """Steps 1-4 of the official extraction; None where the official code would call the LLM."""
    if not response:
        return ""
    if problem.multiple_choice and response in problem.choices:
        return response
    if problem.answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if problem.answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    quick = _QUICK.search(response)
    if quick:
        return quick.group(1)
    return None


def _clean(tail: str) -> str:
    tail = tail.strip().splitlines()[0].strip() if tail.strip() else ""
    return tail.rstrip(".").strip().strip("$\"'").strip()


def fallback(response: str, problem: Problem) -> str | None:
    """The rules standing in for the LLM (see the module docstring); None when none applies."""
    text = response.strip()
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        found = pattern.findall(text)
        if found and _clean(found[-1]):
            text = _clean(found[-1])
            break
    if problem.multiple_choice:
        options = {chr(ord("A") + i) for i in range(len(problem.choices))}
        lead = _LEADING_LETTER.match(text)
        letter = (lead.group(1) or lead.group(2)).upper() if lead else None
        if letter in options:
            return letter
        bracketed = [m for m in _BRACKETED.findall(text) if m.upper() in options]
        if bracketed:
            return bracketed[-1].upper()
        standalone = [m for m in re.findall(r"\b([A-Z])\b", text) if m in options]
        if standalone:
            return standalone[-1]
        return text if text != response.strip() else None
    if problem.answer_type in ("integer", "float"):
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    if problem.answer_type == "list":
        lists = _LIST.findall(text)
        return lists[-1] if lists else None
    return text if text != response.strip() else None


def extract(response: str, problem: Problem) -> Extraction:
    """The extracted answer and whether it needed the rule-based fallback (or was not readable at all)."""
    official = official_extract(response, problem)
    if official is not None:
        return Extraction(official)
    ruled = fallback(response, problem)
    if ruled is None:
        return Extraction(response.strip(), fallback=True, unparsed=True)
    return Extraction(ruled, fallback=True)


def nearest_choice(prediction: str, choices: Sequence[str]) -> str:
    """The choice with the smallest Levenshtein distance to the prediction (the first one on ties)."""
    distances = [levenshtein(prediction, c) for c in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted_answer(extraction: str, problem: Problem) -> str | None:
    """The official normalisation of an extracted answer (see the module docstring)."""
    if problem.multiple_choice:
        text = str(extraction).strip()
        letter = re.findall(r"\(([a-zA-Z])\)", text)
        if letter:
            text = letter[0].upper()
        options = [chr(ord("A") + i) for i in range(len(problem.choices))]
        if text in options:
            return problem.choices[options.index(text)]
        return nearest_choice(text, problem.choices)
    try:
        if problem.answer_type == "integer":
            return str(int(float(extraction)))
        if problem.answer_type == "float":
            return str(round(float(extraction), int(problem.precision)))
        if problem.answer_type == "list":
            return str(extraction)
    except (ValueError, TypeError, OverflowError):
        return None
    return extraction


def is_correct(prediction: str | None, answer: str) -> bool:
    """The official `safe_equal`."""
    return str(prediction).strip() == str(answer).strip()
