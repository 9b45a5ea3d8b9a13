"""Label masks: exactly the expected spans, in both loss modes, for the conversation shapes users train on."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.finetune_data import colour_image
from idefics3.finetune.collate import collate, label_tokens
from idefics3.finetune.data import BadRow
from idefics3.finetune.encode import IGNORE, ConversationEncoder

RNG = np.random.default_rng(0)
IMG_A, IMG_B = colour_image("red", RNG), colour_image("blue", RNG, size=(20, 70))


def user(*parts):
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def assistant(*parts):
    return {"role": "assistant", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def image(img):
    return {"type": "image", "image": img}


CONVERSATIONS = {
    "single-turn": ([user(image(IMG_A), "What is it?"), assistant("A red patch.")], ["A red patch."]),
    "multi-turn": ([user(image(IMG_A), "Colour?"), assistant("Red."), user("Sure?"), assistant("Yes, red.")],
                   ["Red.", "Yes, red."]),
    "multi-image": ([user(image(IMG_A), image(IMG_B), "Compare them."), assistant("One is red, one is blue.")],
                    ["One is red, one is blue."]),
    "text-only": ([user("Say hi."), assistant("Hi!"), user("Again."), assistant("Hi again!")], ["Hi!", "Hi again!"]),
}


def segment_ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    raise AssertionError(f"{needle} not found after {start}")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_and_pixels_equal_the_processor(processor, name):
    messages, _ = CONVERSATIONS[name]
    example = ConversationEncoder(processor)(messages)
    ref = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="np")
    assert example.input_ids == ref["input_ids"][0].tolist()
    if "pixel_values" in ref:
        np.testing.assert_array_equal(example.pixel_values, ref["pixel_values"][0])
        np.testing.assert_array_equal(example.pixel_attention_mask, ref["pixel_attention_mask"][0])
    else:
        assert example.pixel_values is None


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_assistant_mode_trains_exactly_the_answers_and_their_end_of_utterance(processor, name):
    messages, answers = CONVERSATIONS[name]
    example = ConversationEncoder(processor, loss_on="assistant")(messages)
    ids = example.input_ids
    expected = [IGNORE] * len(ids)
    header = segment_ids(processor, "Assistant:")
    cursor = 0
    for answer in answers:
        span = segment_ids(processor, " " + answer + "<end_of_utterance>")
        start = find(ids, header + span, cursor) + len(header)
        expected[start:start + len(span)] = span
        cursor = start + len(span)
    assert example.labels == expected
    # the newline after each <end_of_utterance> and everything the user wrote carry no loss
    assert processor.tokenizer.decode([t for t in example.labels if t != IGNORE]) == \
        "".join(f" {a}<end_of_utterance>" for a in answers)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_all_mode_trains_every_token_but_image_expansions(processor, name):
    messages, _ = CONVERSATIONS[name]
    example = ConversationEncoder(processor, loss_on="all")(messages)
    tokens = processor.tokenizer.convert_ids_to_tokens(example.input_ids)
    # The image blocks: from each opening <fake_token_around_image> to the last one of the block.
    in_image = np.zeros(len(tokens), dtype=bool)
    i = 0
    while i < len(tokens):
        if tokens[i] == "<fake_token_around_image>":
            j = i
            while j < len(tokens) and tokens[j] != "<global-img>":
                j += 1
            j = tokens.index("<fake_token_around_image>", j)  # the global image's closing marker
            in_image[i:j + 1] = True
            i = j + 1
        else:
            i += 1
    expected = [IGNORE if masked else t for t, masked in zip(example.input_ids, in_image)]
    assert example.labels == expected
    assert (np.array(example.input_ids) == processor.image_token_id).sum() == (example.pixel_values.shape[0] * 4
                                                                                if example.pixel_values is not None
                                                                                else 0)


def test_no_image_marker_or_padding_token_ever_carries_loss(processor):
    messages, _ = CONVERSATIONS["multi-image"]
    never = {processor.image_token_id, processor.fake_image_token_id, processor.tokenizer.pad_token_id,
             processor.tokenizer.convert_tokens_to_ids("<global-img>"),
             processor.tokenizer.convert_tokens_to_ids("<row_1_col_1>")}
    for mode in ("assistant", "all"):
        example = ConversationEncoder(processor, loss_on=mode)(messages)
        assert not never & set(example.labels)
    # an image inside the answer: its expansion is masked even in the trained span
    example = ConversationEncoder(processor)([user("Draw red."), assistant(image(IMG_A), "Here.")])
    labels = [t for t in example.labels if t != IGNORE]
    assert processor.tokenizer.decode(labels) == "Here.<end_of_utterance>"


def test_collate_pads_right_and_masks_padding(processor):
    encoder = ConversationEncoder(processor)
    examples = [encoder(CONVERSATIONS[n][0]) for n in ("text-only", "single-turn", "multi-image")]
    assert processor.tokenizer.padding_side == "left"  # generation's side; training must ignore it
    batch = collate(examples, processor.tokenizer.pad_token_id)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][i, :n].tolist() == e.input_ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][i, n:] == IGNORE).all()
    frames = [0 if e.pixel_values is None else e.pixel_values.shape[0] for e in examples]
    assert batch["pixel_values"].shape[:2] == (3, max(frames))
    assert batch["pixel_values"][0].abs().sum() == 0  # the text-only sample: padding frames only
    assert label_tokens(batch) == sum(e.num_label_tokens for e in examples)


def test_rows_without_answers_or_too_long_are_bad_rows(processor):
    with pytest.raises(BadRow, match="no assistant turn"):
        ConversationEncoder(processor)([user("Hello?")])
    with pytest.raises(BadRow, match="too long"):
        ConversationEncoder(processor, max_length=20)(CONVERSATIONS["single-turn"][0])
    with pytest.raises(BadRow, match="bad format"):  # a literal placeholder instead of an image part
        ConversationEncoder(processor)([user("<image> what?"), assistant("No.")])
