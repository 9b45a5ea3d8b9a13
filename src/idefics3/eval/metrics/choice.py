"""Multiple-choice scoring rules: MMStar's official rule, lmms-eval's exact match (AI2D), VLMEvalKit's can_infer.

`mmstar_hit` is MMStar's own evaluator (MMStar-Benchmark `eval/vlmeval/evaluate/mmstar.py`): after lowercasing
and stripping, the answer is a hit when its first character is the gold letter, or it starts with "(" and the
second is, or it starts with "option " / "the answer is " and the letter right after is. Loose by design: "Bird"
counts for gold B. The score is hits over questions; lmms-eval instead averages over the 18 l2 categories and
then across them, which differs from the plain mean once subsets are unbalanced (`--limit`): both are reported.

`exact_match` is lmms-eval's metric for AI2D (`exact_match` with ignore_case and ignore_punctuation, ported from
Hugging Face `evaluate`): the answer equals the gold letter once both are lowercased and stripped of
`string.punctuation`.

`can_infer` is VLMEvalKit's rule stage (`vlmeval/utils/matching_util.py`) before its LLM judge: exactly one
option letter standing alone among the answer's words, within its last five words (else a lone "Z" for "none of
these"), otherwise exactly one option *text* contained in the lowercased answer; False when neither decides.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_SPLIT_CHARS = ".()[],:;!*#{}"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def mmstar_hit(prediction: str, gold: str) -> bool:
    """MMStar's official rule (see the module docstring)."""
    pred, gt = prediction.lower().strip(), gold.lower().strip()

    def at(i: int) -> str:
        return pred[i] if len(pred) > i else ""

    if not gt:
        return False
    return (at(0) == gt or (pred.startswith("(") and at(1) == gt)
            or (pred.startswith("option ") and at(7) == gt)
            or (pred.startswith("the answer is ") and at(14) == gt))


def exact_match(prediction: str, gold: str) -> bool:
    """lmms-eval's exact_match(ignore_case=True, ignore_punctuation=True)."""
    return prediction.lower().translate(_PUNCTUATION_TABLE) == gold.lower().translate(_PUNCTUATION_TABLE)


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | bool:
    """The option letter standing alone in the answer, "Z", or False."""
    if "Failed to obtain answer via API" in answer:
        return False
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    for c in _SPLIT_CHARS:
        answer = answer.replace(c, " ")
    splits = [x.strip() for x in answer.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
        return "Z"
    return False


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | bool:
    """The one option whose text the lowercased answer contains, or False."""
    answer = answer.lower()
    found = [k for k, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else False


def can_infer(answer: str, choices: Mapping[str, str]) -> str | bool:
    """VLMEvalKit's rule-based matching: the letter, else the text, else False (it would ask its judge)."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)
