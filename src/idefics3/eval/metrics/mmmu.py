"""MMMU's answer parsing and scoring, ported from the official MMMU-Benchmark/MMMU `mmmu/utils/eval_utils.py`.

Multiple choice (`parse_multiple_choice`): the response is stripped of , . ! ? ; : ' at both ends and padded with
spaces; candidates are the options written "(X)", else " X " between spaces, else (only for responses of more
than five words) options whose *text* the response contains. Of several candidates the one whose last occurrence
is latest wins. With none, the official code draws `random.choice` from a generator seeded 42 at import, so its
pick depends on how many draws came before; here every such draw is the first draw of `random.Random(42)`,
which equals the official pick for the first unparseable answer and keeps results independent of order,
sharding and resuming. Such answers are flagged (`random=True`) so the share can be reported. lmms-eval's copy
also accepts "X " and "X." (a later edit); the official rule is kept.

Open answers (`parse_open`): the response is split into sentences; from each the shortest tail after an
indicator word ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", and "=" in the
last sentence) is kept, then every number in those tails is added; numbers become floats rounded to 2 places,
strings are lowercased (one-character strings become " x" / "x "). `open_correct` is true when a predicted
number equals a normalised gold number, or a gold string is a substring of a predicted string. The full parsed
list is scored (lmms-eval since 2025-06 keeps only its first element, which breaks the rule).
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence

RANDOM_SEED = 42
_STRIP = (",", ".", "!", "?", ";", ":", "'")
_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def letters(n: int) -> list[str]:
    """The option letters of n options: A, B, C, ..."""
    return [chr(ord("A") + i) for i in range(n)]


def parse_options(options: str | Sequence[str] | None) -> list[str]:
    """MMMU stores options as the *text* of a Python list ("['1 m/s', '2 m/s']"); this returns the list."""
    if options is None:
        return []
    if isinstance(options, str):
        value = ast.literal_eval(options) if options.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"MMMU options must be a list, got {options!r}")
        return [str(v) for v in value]
    return [str(v) for v in options]


def parse_multiple_choice(response: str, options: Sequence[str]) -> tuple[str, bool]:
    """(chosen letter, whether it was drawn at random because nothing could be parsed)."""
    choices = letters(len(options))
    index2ans = dict(zip(choices, options))
    for char in _STRIP:
        response = response.strip(char)
    response = f" {response} "
    by_letter, bracketed = True, False
    candidates = [c for c in choices if f"({c})" in response]
    if candidates:
        bracketed = True
    else:
        candidates = [c for c in choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        by_letter = False
    if not candidates:
        return random.Random(RANDOM_SEED).choice(choices), True
    if len(candidates) == 1:
        return candidates[0], False
    if by_letter:
        pattern = "({})" if bracketed else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))], False


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalise(text: str) -> list[float | str]:
    """A number becomes [float rounded to 2 places]; a string [lowercased] (one character: [" x", "x "])."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    """Every number written in `text`: comma-grouped, scientific, then plain."""
    return _COMMAS.findall(text) + _SCIENTIFIC.findall(text) + _SIMPLE.findall(text)


def _key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = list(_INDICATORS)
    keys = []
    for i, sentence in enumerate(sentences):
        if i == len(sentences) - 1:
            indicators.append("=")
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list[float | str]:
    """The candidate answers of an open response (normalised, without duplicates, in a stable order)."""
    keys = _key_responses(response)
    pieces = list(keys)
    for key in keys:
        pieces.extend(extract_numbers(key))
    out: list[float | str] = []
    for piece in pieces:
        for value in normalise(piece):
            if value not in out:
                out.append(value)
    return out


def gold_answers(answer: str | Sequence[str]) -> list[str]:
    """The gold answer(s): a list written as text ("['a', 'b']") is read as several."""
    if isinstance(answer, str):
        text = answer.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return [answer]
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
        return [answer]
    return [str(a) for a in answer]


def open_correct(parsed: Sequence[float | str], answer: str | Sequence[str]) -> bool:
    """The official `eval_open`: a float equal to a gold float, or a gold string inside a predicted string."""
    gold: list[float | str] = []
    for a in gold_answers(answer):
        gold.extend(normalise(a))
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in gold):
                return True
        elif pred in gold:
            return True
    return False


def multiple_choice_correct(letter: str, answer: str | Sequence[str]) -> bool:
    """The official `eval_multi_choice`: the letter equals the gold letter (or one of several)."""
    return letter in gold_answers(answer)
