"""ChartQA's relaxed accuracy (pix2struct's `relaxed_correctness`, as lmms-eval's `tasks/chartqa/utils.py` and
VLMEvalKit use it).

A string ending in "%" is read as that number divided by 100. When the prediction is a number and the target a
non-zero number, the prediction is correct within 5% of the target (inclusive); otherwise (a target of 0 or a
non-number, or a prediction that is not a number) the two must be equal ignoring case. Nothing else is
normalised: "1,000" is not a number here, exactly as upstream.
"""

from __future__ import annotations

MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """Whether the prediction matches the target under ChartQA's relaxed rule."""
    prediction, target = str(prediction), str(target)
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()
