"""`widen` (applied by the recipe's install): the wider checkpoint computes the same logits as the trained one,
and its width is a multiple of the head count (what transformers' config validation requires)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from recipes.demo.conversations import conversation
from recipes.demo.dataset import write_dataset
from recipes.demo.recipe import init_checkpoint, tokenizer_corpus
from recipes.demo.widen import widen, widened_size

from idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor


def test_widened_checkpoint_gives_the_same_logits(tmp_path):
    texts = tokenizer_corpus(write_dataset(tmp_path / "data", 0, 40, name="train.jsonl", turns=4))
    trained = init_checkpoint(tmp_path / "init", texts, marker_head=True, heads=6, kv_heads=6)
    model = Idefics3ForConditionalGeneration.from_pretrained(trained).eval()
    with torch.no_grad():  # trained-like norms: not all ones, so the rescaling is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "text_model" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(trained)
    wide = shutil.copytree(trained, tmp_path / "wide")
    assert widen(wide) == 132 and widen(wide) == 132  # a second call changes nothing
    config = json.loads((wide / "config.json").read_text())["text_config"]
    assert config["hidden_size"] % config["num_attention_heads"] == 0 and config["head_dim"] == 32
    other = Idefics3ForConditionalGeneration.from_pretrained(wide).eval()
    processor = Idefics3Processor.from_pretrained(trained)
    rng = random.Random(3)
    for _ in range(3):
        ex = conversation(rng, {"two": 1.0, "colour": 1.0}, turns=2)
        batch = dict(processor(text=processor.apply_chat_template(ex.messages()), images=ex.images,
                               return_tensors="pt"))
        with torch.no_grad():
            a, b = model(**batch).logits, other(**batch).logits
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


@pytest.mark.parametrize("hidden, heads, wide", [(128, 6, 132), (128, 4, 128), (130, 6, 132)])
def test_widened_size_is_the_next_multiple(hidden, heads, wide):
    assert widened_size(hidden, heads) == wide
