"""The built-in model on 200 held-out questions (a seed never used in training).

Targets (the README's demo table): colour, shape, count and position 95% exact match or better; reading the word 80%;
two-image questions 90%. Accuracy only: how long the evaluation takes depends on the machine and its load, so it
is measured by bench/demo_eval.py (per-question latency, medians, the CPU model), not asserted here.
"""

from __future__ import annotations

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
def held_out() -> EvalReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fastest for a 1M-parameter model
    try:
        processor = idefics3.Idefics3Processor.from_pretrained(idefics3.DEMO_MODEL)
        model = idefics3.Idefics3ForConditionalGeneration.from_pretrained(idefics3.DEMO_MODEL).eval()
        return evaluate(model, processor, seed=EVAL_SEED, count=EVAL_COUNT)
    finally:
        torch.set_num_threads(threads)


def test_200_held_out_questions_are_all_answered(held_out):
    assert EVAL_SEED != 0 and len(held_out.records) == 200
    assert {r.kind for r in held_out.records} == set(TARGETS)  # every type asked, so every target is checked


@pytest.mark.xfail(MISSED is not None, reason=f"targets not reached yet: {MISSED}", strict=True)
def test_accuracy_per_type_meets_the_targets(held_out):
    report = held_out
    table = "\n".join(report.lines())
    for kind, target in TARGETS.items():
        assert report.accuracy(kind) >= target, f"{kind} below {target:.0%}\n{table}"
