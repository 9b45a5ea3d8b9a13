"""Turning a stream of token ids into a stream of text pieces.

`IncrementalDecoder` is the core: it decodes a short window of recent tokens twice (without and with
the new ones) and emits only the difference, holding text back while it ends in U+FFFD (a UTF-8
character whose bytes are split across tokens). The pieces therefore never split a multi-byte
character, and their concatenation equals decoding all the ids at once (for the byte-level
tokenizers of Idefics3/SmolVLM, which do no clean-up of spaces).

`TextIteratorStreamer` is the transformers-compatible wrapper: `generate(..., streamer=s)` calls
`s.put(ids)` / `s.end()` in the generating thread while another thread iterates over `s`.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import torch

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed ids with `push`, get the new complete text; `flush` returns whatever is still held back."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.decode_kwargs = {"skip_special_tokens": skip_special_tokens, **decode_kwargs}
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window re-decoded with the new ids
        self.read_offset = 0    # ids before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)

    def push(self, ids: int | list[int]) -> str:
        """Add ids; return the text they complete ("" while a character or token is unfinished)."""
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """The text not yet emitted (possibly ending in U+FFFD if the ids stop mid-character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class TextIteratorStreamer:
    """An iterator of text pieces fed by `generate` (batch size 1), as in transformers.

    Args:
        tokenizer: anything with `decode(ids, skip_special_tokens=...)` (e.g. `processor.tokenizer`).
        skip_prompt: drop the first `put` (generate puts the prompt ids before the new tokens).
        timeout: seconds `__next__` waits for a piece before raising `queue.Empty`; None waits forever.
        **decode_kwargs: passed to `tokenizer.decode`; as in transformers skip_special_tokens defaults to
            False, so pass skip_special_tokens=True to hide `<end_of_utterance>`.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        skip_special = bool(decode_kwargs.pop("skip_special_tokens", False))
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self._decode_kwargs = {"skip_special_tokens": skip_special, **decode_kwargs}
        self._decoder = IncrementalDecoder(tokenizer, **self._decode_kwargs)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._next_is_prompt = True

    def put(self, value: torch.Tensor | list[int] | int) -> None:
        """Receive ids: the prompt first (skipped if skip_prompt), then each new token."""
        ids = _as_ids(value)
        if self._next_is_prompt:
            self._next_is_prompt = False
            if self.skip_prompt:
                return
        text = self._decoder.push(ids)
        if text:
            self._queue.put(text)

    def end(self) -> None:
        """Flush held-back text and close the iterator; the streamer can then be reused."""
        text = self._decoder.flush()
        if text:
            self._queue.put(text)
        self._queue.put(None)
        self._decoder = IncrementalDecoder(self.tokenizer, **self._decode_kwargs)
        self._next_is_prompt = True

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        text = self._queue.get(timeout=self.timeout)
        if text is None:
            raise StopIteration
        return text


def _as_ids(value: torch.Tensor | list[int] | int) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TextIteratorStreamer only supports batch size 1")
            value = value[0]
        return [int(v) for v in value.tolist()]
    return [int(v) for v in value]
