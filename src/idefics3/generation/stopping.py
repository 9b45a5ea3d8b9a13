"""When a sequence stops: an eos id, its token budget, the end of its cache slot, or a stop string.

The engine checks ids only; a stop string is an opaque `StopCondition` built here from a tokenizer,
so the engine never handles text. `StopStrings` has transformers' `StopStringCriteria` semantics:
generation stops at the first token that completes a stop string (the stop string must overlap the
newest token, which may run past its end), and the stop string stays in the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

STOP = "stop"      # an eos id or a stop string was generated
LENGTH = "length"  # max_new_tokens reached, or the sequence filled its cache slot


class StopCondition(Protocol):
    """A per-sequence check on the ids generated so far (the newest last); True stops the sequence."""

    def __call__(self, generated: Sequence[int]) -> bool: ...


class StopStrings:
    """Stops when the decoded text of the newest tokens contains any of `stop_strings`.

    Only a window of the newest tokens is decoded (enough to cover the longest stop string: a token
    decodes to at least one character, a partial UTF-8 byte to U+FFFD), so the cost per token does
    not grow with the length of the answer. Special tokens are decoded too, so "<end_of_utterance>"
    can be a stop string.
    """

    def __init__(self, stop_strings: Sequence[str] | str, tokenizer: Any | Callable[[list[int]], str]) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.stop_strings = [s for s in stop_strings if s]
        if not self.stop_strings:
            raise ValueError("stop_strings must hold at least one non-empty string")
        if callable(getattr(tokenizer, "decode", None)):
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        elif callable(tokenizer):
            self._decode = tokenizer
        else:
            raise ValueError("stop strings need a tokenizer (pass tokenizer=processor.tokenizer)")
        self.window = max(len(s) for s in self.stop_strings) + 1

    def __call__(self, generated: Sequence[int]) -> bool:
        if not generated:
            return False
        text = self._decode(list(generated[-self.window:]))
        return any(s in text for s in self.stop_strings)


def finish_reason(generated: Sequence[int], stop_ids: frozenset[int], max_new_tokens: int,
                  total_len: int, max_seq_len: int, stop: StopCondition | None = None) -> str | None:
    """Why a sequence must stop after its newest token (`generated[-1]`), or None to go on.

    total_len counts prompt + generated; a sequence whose newest token would not fit in its cache
    slot at the next step stops with LENGTH.
    """
    if generated and generated[-1] in stop_ids:
        return STOP
    if stop is not None and stop(generated):
        return STOP
    if len(generated) >= max_new_tokens or total_len >= max_seq_len:
        return LENGTH
    return None
