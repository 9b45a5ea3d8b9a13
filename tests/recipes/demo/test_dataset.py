"""The recipe's fine-tuning data: chat JSONL with images beside it that `finetune` reads, and the warm-up stage."""

from __future__ import annotations

import json

from recipes.demo.conversations import warmup_examples
from recipes.demo.dataset import write_dataset


def test_dataset_is_chat_jsonl_with_relative_images(tmp_path):
    path = write_dataset(tmp_path, seed=1, count=12)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        user, assistant = row["messages"]
        assert assistant["role"] == "assistant" and assistant["content"][0]["text"]
        for part in user["content"][:-1]:
            assert part["type"] == "image" and (tmp_path / part["image"]).is_file()
        assert user["content"][-1]["type"] == "text"


def test_warmup_is_one_shape_colour_and_shape_questions(tmp_path):
    exs = list(warmup_examples(0, 10))
    assert [e.kind for e in exs] == ["shape", "colour"] * 5
    assert all(len(e.images) == 1 for e in exs)
    path = write_dataset(tmp_path, seed=0, count=4, name="warm.jsonl", warmup=True)
    assert len(path.read_text().splitlines()) == 4
