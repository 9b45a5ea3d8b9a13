"""ANLS, the DocVQA metric: average normalised Levenshtein similarity, with scores under 0.5 set to 0.

This is lmms-eval's `anls` (lmms_eval/api/metrics.py, from Qwen-VL's infovqa evaluation), which the published
DocVQA validation numbers come from. Per reference: both strings are lowercased, stripped and their inner
whitespace collapsed; NL = Levenshtein(gt, pred) / max(len(gt), len(pred)), where the lengths are those of the
strings *before* normalisation (a quirk: padding spaces shrink NL). A question scores 1 - min NL over its
references, and 0 when that is below the threshold (exactly 0.5 is kept). An empty prediction against non-empty
references scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalised_distance(reference: str, prediction: str) -> float:
    """NL of one reference: the distance of the normalised strings over the longer *raw* length."""
    length = max(len(reference.upper()), len(prediction.upper()))
    if length == 0:
        return 0.0
    return levenshtein(_normalise(reference), _normalise(prediction)) / length


def anls(prediction: str, references: Sequence[str], threshold: float = THRESHOLD) -> float:
    """The ANLS score of one question in [0, 1]."""
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    score = 1.0 - min(normalised_distance(ref, prediction) for ref in references)
    return 0.0 if score < threshold else score
