"""Fixtures for the fine-tuning tests (the data helpers live in finetune_data.py)."""

from __future__ import annotations

import pytest

from finetune.finetune_data import write_colour_task


@pytest.fixture(scope="session")
def processor(tiny_checkpoint):
    from idefics3 import Idefics3Processor

    return Idefics3Processor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def colour_task(tmp_path_factory):
    """(train.jsonl, eval.jsonl) of the colour task."""
    folder = tmp_path_factory.mktemp("colours")
    return write_colour_task(folder, 24, seed=0), write_colour_task(folder, 6, seed=1, name="eval.jsonl")
