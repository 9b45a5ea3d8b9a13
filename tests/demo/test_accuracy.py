"""The built-in model on 200 held-out questions (a seed never used in training), in under two minutes on CPU.

Targets (issue 7): colour, shape, count and position 95% exact match or better; reading the word 80%;
two-image questions 90%.
"""

from __future__ import annotations

import time

import pytest
import torch

import idefics3
from idefics3.demo.commands import EVAL_COUNT, EVAL_SEED
from idefics3.demo.evaluate import EvalReport, evaluate

TARGETS = {"colour": 0.95, "shape": 0.95, "count": 0.95, "position": 0.95, "word": 0.80, "two": 0.90}
# Set while the packaged model misses a target, with its measured accuracies; strict, so that a model that
# meets every target turns this into a failure until the marker is removed.
MISSED: str | None = None

pytestmark = pytest.mark.skipif(not (idefics3.DEMO_MODEL / "config.json").is_file(), reason="no built-in model")


@pytest.fixture(scope="module")
def held_out() -> tuple[EvalReport, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fastest for a 1M-parameter model
    try:
        start = time.perf_counter()
        processor = idefics3.Idefics3Processor.from_pretrained(idefics3.DEMO_MODEL)
        model = idefics3.Idefics3ForConditionalGeneration.from_pretrained(idefics3.DEMO_MODEL).eval()
        report = evaluate(model, processor, seed=EVAL_SEED, count=EVAL_COUNT)
        return report, time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def test_200_held_out_questions_in_under_two_minutes(held_out):
    report, elapsed = held_out
    assert EVAL_SEED != 0 and len(report.records) == 200
    assert elapsed < 120, f"{elapsed:.0f}s"


@pytest.mark.xfail(MISSED is not None, reason=f"targets not reached yet: {MISSED}", strict=True)
def test_accuracy_per_type_meets_the_targets(held_out):
    report, _ = held_out
    table = "\n".join(report.lines())
    for kind, target in TARGETS.items():
        assert report.accuracy(kind) >= target, f"{kind} below {target:.0%}\n{table}"
