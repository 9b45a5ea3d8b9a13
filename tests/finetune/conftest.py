"""Fixtures for the fine-tuning tests (the data helpers live in finetune_data.py)."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.finetune_data import colour_image, write_colour_task


@pytest.fixture(scope="session")
def processor(tiny_checkpoint):
    from idefics3 import Idefics3Processor

    return Idefics3Processor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def colour_task(tmp_path_factory):
    """(train.jsonl, eval.jsonl) of the colour task."""
    folder = tmp_path_factory.mktemp("colours")
    return write_colour_task(folder, 24, seed=0), write_colour_task(folder, 6, seed=1, name="eval.jsonl")


@pytest.fixture(scope="module")
def inputs(processor):
    """One image question and its answer as model inputs (the LoRA and QLoRA tests' logits)."""
    messages = [{"role": "user", "content": [{"type": "image", "image": colour_image("red", np.random.default_rng(0))},
                                             {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
