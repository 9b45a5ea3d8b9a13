"""Streaming: pieces never split a character and add up to the non-streamed text; callbacks; stop strings."""

from __future__ import annotations

import threading

import pytest
import torch

from idefics3 import TextIteratorStreamer
from idefics3.generation.stopping import StopStrings, finish_reason
from idefics3.generation.streamer import IncrementalDecoder

MULTIBYTE = "Voilà: naïve 世界, emoji 🎉🦜 and ÅÄÖ — done."


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_incremental_decoder_never_splits_a_character(tokenizer):
    ids = encode(tokenizer, MULTIBYTE)
    assert len(ids) > len(MULTIBYTE) // 4  # byte-level pieces: some characters take several tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it really streams


def test_incremental_decoder_skips_special_tokens(tokenizer):
    ids = encode(tokenizer, "Hello world")
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    text = "".join(decoder.push(t) for t in [*ids, 49279]) + decoder.flush()
    assert text == "Hello world"


def test_streamer_equals_non_streamed_text(model, processor, tokenizer, images, chat_prompt):
    inputs = processor(text=chat_prompt("Describe it.", 1), images=[images[0]], return_tensors="pt")
    t = inputs["input_ids"].shape[1]
    expected = model.generate(**inputs, max_new_tokens=16)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    seen: list[tuple[int, int]] = []
    result: dict[str, torch.Tensor] = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "ids", model.generate(**inputs, max_new_tokens=16, streamer=streamer,
                              callback=lambda row, tok: seen.append((row, tok)))))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert torch.equal(result["ids"], expected)
    assert "".join(pieces) == tokenizer.decode(expected[0, t:].tolist(), skip_special_tokens=True)
    assert seen == [(0, tok) for tok in expected[0, t:].tolist()]


def test_streamer_without_skip_prompt_streams_the_prompt_too(tokenizer):
    streamer = TextIteratorStreamer(tokenizer)
    streamer.put(torch.tensor([encode(tokenizer, "User: hi")]))
    streamer.put(torch.tensor([encode(tokenizer, " there")[0]]))
    streamer.end()
    assert "".join(streamer).startswith("User: hi")


def test_streamer_rejects_batches(model, processor, tokenizer, chat_prompt):
    inputs = processor(text=[chat_prompt("a", 0), chat_prompt("bb", 0)], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="batch"):
        model.generate(**inputs, max_new_tokens=2, streamer=TextIteratorStreamer(tokenizer))


def test_callback_sees_every_row(model, processor, chat_prompt):
    inputs = processor(text=[chat_prompt("a", 0), chat_prompt("a longer one", 0)], return_tensors="pt",
                       padding=True)
    got: dict[int, list[int]] = {0: [], 1: []}
    out = model.generate(**inputs, max_new_tokens=5, callback=lambda row, tok: got[row].append(tok))
    t = inputs["input_ids"].shape[1]
    assert [got[0], got[1]] == out[:, t:].tolist()


class FakeTokenizer:
    """Token i decodes to PIECES[i]."""

    PIECES = ["la", "st", "op", "s", "to", "pped", "stop", "at", "opera", "xyz"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[i] for i in ids)


@pytest.mark.parametrize("ids, stops", [
    ([1, 2], True),          # "st" "op"
    ([6], True),             # "stop"
    ([1, 8], True),          # "st" "opera": the newest token may run past the stop string
    ([3, 4, 5], True),       # "s" "to" "pped"
    ([0, 9], False),
    ([9, 3, 4], False),      # "sto" not yet complete
])
def test_stop_strings_semantics(ids, stops):
    assert StopStrings(["stop"], FakeTokenizer())(ids) is stops


def test_stop_strings_only_look_at_a_window():
    check = StopStrings(["stop"], FakeTokenizer())
    assert check([6] + [9] * 10) is False  # an old match is not re-reported (the window moved on)
    with pytest.raises(ValueError, match="tokenizer"):
        StopStrings(["x"], object())


def test_finish_reason():
    eos = frozenset({7})
    assert finish_reason([1, 7], eos, 10, 5, 100) == "stop"
    assert finish_reason([1, 2], eos, 2, 5, 100) == "length"
    assert finish_reason([1, 2], eos, 10, 100, 100) == "length"
    assert finish_reason([1, 2], eos, 10, 5, 100) is None
    assert finish_reason([1, 2], eos, 10, 5, 100, stop=lambda ids: ids[-1] == 2) == "stop"
