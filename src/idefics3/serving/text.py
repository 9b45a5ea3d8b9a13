"""One choice's answer as text: incremental decoding, OpenAI's stop-string rule, and token log-probabilities.

The engine stops a sequence at the token that completes a stop string (stopping.StopStrings); OpenAI's API
then returns the text *before* the stop string. While streaming, text that could still turn out to be the
start of a stop string is held back (at most the longest stop string minus one character), so a client never
receives text that the final answer does not contain. The first piece of a chat answer loses its leading
space (the model writes " Answer" after "Assistant:"), as `idefics3.ask` does.
"""

from __future__ import annotations

from typing import Any

from ..generation.sequence import TokenEvent
from ..generation.streamer import IncrementalDecoder
from .protocol import TokenLogprob, TopLogprob


class ChoiceText:
    def __init__(self, tokenizer: Any, stop: list[str], strip_leading: bool) -> None:
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.strip_leading = strip_leading
        self.text = ""       # all text decoded so far (leading space stripped)
        self.sent = 0        # characters of self.text already handed out
        self.tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []

    def push(self, event: TokenEvent) -> str:
        """Take one token; return the text that may now be sent."""
        self.tokens += 1
        piece = self.decoder.push(event.token_id)
        if event.finish_reason is not None:
            piece += self.decoder.flush()
            self.finish_reason = event.finish_reason
        if not self.text and self.strip_leading:
            piece = piece.lstrip()
        self.text += piece
        if event.logprob is not None:
            self.logprobs.append(self._logprob(event))
        if self.stop:
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = self.finish_reason or "stop"
        end = len(self.text) if self.finish_reason is not None else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprob(self, event: TokenEvent) -> TokenLogprob:
        text = self._token_text(event.token_id)
        top = [TopLogprob(token=(t := self._token_text(i)), logprob=lp, bytes=list(t.encode()))
               for i, lp in event.top_logprobs or []]
        return TokenLogprob(token=text, logprob=event.logprob, bytes=list(text.encode()), top_logprobs=top)
