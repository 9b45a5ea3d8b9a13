"""Grammar-constrained decoding for the server's `response_format`: JSON mode and JSON Schema.

    grammars = JsonGrammars(checkpoint / "tokenizer.json", vocab_size=model_vocab, eos_token_ids=[49279])
    constraint = grammars.constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    # the engine, per token of that sequence: logits[~constraint.allowed()] = -inf; sample; constraint.accept(t)

An OpenAI-compatible `response_format` asks for output that parses as JSON ({"type": "json_object"}) or that also
validates against a JSON Schema ({"type": "json_schema", ...}). Sampling alone cannot promise that, so before each
token the engine masks out every token that would make the text stop being a prefix of some valid document.

The masks come from llguidance, the maintained library behind vLLM's and SGLang's "guidance" backends: it compiles
the schema to a grammar, walks a trie of the tokenizer's byte strings with an incremental parser, and so tracks any
tokenization of the text (not only the canonical one) at a few microseconds per token for a 49k vocabulary. Building
its tokenizer view takes a fraction of a second, so `JsonGrammars` does it once from the checkpoint's tokenizer.json
(through the `tokenizers` library; no transformers) and hands out a cheap fresh matcher per sequence.

Why it is built this way:
- the mask is a bool tensor of the model's width: llguidance's bitmask (one bit per tokenizer token) is unpacked with
  numpy, and ids the tokenizer does not have (a model vocab padded past it) stay False;
- end of output is the engine's business: once the document is complete the only allowed tokens are the eos ids
  given here (all of them), so sampling one finishes the sequence with "stop"; while it is incomplete no eos is
  allowed. A top-level value that may still grow (a bare number) allows both its continuations and eos;
- whitespace between JSON tokens is allowed but bounded (one space, or up to two newlines and twenty spaces/tabs of
  indent, as llama.cpp's JSON grammars do), so compact and pretty-printed output both fit, while a small model
  cannot fall into an endless run of newlines that the unbounded JSON whitespace rule would accept. A schema may
  choose otherwise through llguidance's top-level "x-guidance" options;
- a schema is compiled up front: a malformed `response_format`, a schema that is not valid, unsatisfiable or uses a
  keyword llguidance does not implement (e.g. "not") raises `GrammarError` naming the problem, which the server
  returns as HTTP 400. `strict` is accepted but the schema is always enforced, strict or not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import llguidance
import numpy as np
import torch
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Whitespace allowed between two JSON tokens (a Rust regex, so it also matches nothing).
JSON_WHITESPACE = r"(?:\x20|\n{1,2}[\x20\x09]{0,20})?"

_JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}
_ANY_OBJECT = {"type": "object"}
_TYPES = ("text", "json_object", "json_schema")


class GrammarError(ValueError):
    """A `response_format` that cannot become a grammar; the message names the field and the problem."""


def _json_type(value: object) -> str:
    """The JSON name of a decoded JSON value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class JsonConstraint:
    """One sequence's grammar state, the engine's `TokenConstraint`: ask `allowed()`, sample, then `accept(token)`."""

    def __init__(self, matcher: llguidance.LLMatcher, n_tokens: int, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._matcher = matcher
        self._n_tokens = n_tokens      # ids below this come from llguidance's mask
        self._vocab_size = vocab_size  # the logits' width
        self._eos_token_ids = eos_token_ids
        self._pad = np.zeros(max(vocab_size - n_tokens, 0), dtype=np.uint8)  # ids past the tokenizer: never allowed
        self._error: str | None = None

    @property
    def error(self) -> str | None:
        """Why the grammar failed mid-sequence (the output then ends at eos, unfinished), or None."""
        return self._error

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size] of the tokens allowed next, on CPU; exactly the eos ids once the document is complete."""
        if self._error is None:
            packed = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint32).astype("<u4", copy=False)
            bits = np.unpackbits(packed.view(np.uint8), count=self._n_tokens, bitorder="little")
            if self._matcher.is_error():
                self._fail(self._matcher.get_error())
            elif not bits.any():
                self._fail("the grammar allows no token")
            else:
                if self._pad.size:
                    bits = np.concatenate((bits, self._pad))
                return torch.from_numpy(bits).view(torch.bool)
        mask = torch.zeros(self._vocab_size, dtype=torch.bool)
        mask[self._eos_token_ids] = True
        return mask

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token (eos included; after an error the grammar is no longer followed)."""
        if self._error is None and not self._matcher.consume_token(int(token_id)):
            self._fail(self._matcher.get_error())

    def _fail(self, message: str) -> None:
        # Not raised: the engine runs other sequences in the same step. Allowing only eos ends this one.
        self._error = message or "unknown grammar error"
        logger.warning("grammar-constrained sequence ends early: %s", self._error.splitlines()[0])


class JsonGrammars:
    """Turns `response_format` values into per-sequence token constraints over one tokenizer and model vocab."""

    def __init__(self, tokenizer_json: str | Path, vocab_size: int, eos_token_ids: list[int]) -> None:
        eos = [int(i) for i in eos_token_ids]
        if not eos:
            raise ValueError("eos_token_ids is empty: a constrained sequence could never end")
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        n_tokens = min(tokenizer.get_vocab_size(with_added_tokens=True), int(vocab_size))
        bad = [i for i in eos if not 0 <= i < n_tokens]
        if bad:
            raise ValueError(f"eos token ids {bad} are outside the tokenizer and model vocab (size {n_tokens})")
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = eos
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), eos_token=eos)  # the expensive part, ~0.3 s
        self._n_tokens = min(self.tokenizer.vocab_size, self.vocab_size)

    def constraint(self, response_format: dict[str, Any]) -> JsonConstraint | None:
        """A fresh constraint for one sequence, or None for {"type": "text"}; GrammarError for a bad format."""
        schema = _schema(response_format)
        if schema is None:
            return None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"response_format.json_schema.schema is not valid JSON: {e}") from e
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"response_format.json_schema.schema is not a supported JSON schema: "
                               f"{matcher.get_error()}")
        for warning in matcher.get_grammar_warnings():
            logger.debug("response_format grammar: %s", warning)
        return JsonConstraint(matcher, self._n_tokens, self.vocab_size, self.eos_token_ids)


def _schema(response_format: object) -> dict[str, Any] | None:
    """The JSON Schema a `response_format` asks for, None for plain text; GrammarError for a malformed one."""
    if not isinstance(response_format, dict):
        raise GrammarError(f"response_format must be an object, got {_json_type(response_format)}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _ANY_OBJECT
    if kind != "json_schema":
        expected = ", ".join(repr(t) for t in _TYPES)
        if kind is None:
            raise GrammarError(f"response_format.type is required: one of {expected}")
        raise GrammarError(f"response_format.type must be one of {expected}, got {kind!r}")
    spec = response_format.get("json_schema")
    if spec is None:
        raise GrammarError("response_format.json_schema is required when response_format.type is 'json_schema'")
    if not isinstance(spec, dict):
        raise GrammarError(f"response_format.json_schema must be an object, got {_json_type(spec)}")
    if not isinstance(spec.get("name", ""), str):
        raise GrammarError(f"response_format.json_schema.name must be a string, got {_json_type(spec['name'])}")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise GrammarError(f"response_format.json_schema.strict must be a boolean, got {_json_type(spec['strict'])}")
    schema = spec.get("schema")
    if schema is None:
        raise GrammarError("response_format.json_schema.schema is required")
    if not isinstance(schema, dict):
        raise GrammarError(f"response_format.json_schema.schema must be a JSON Schema object, got {_json_type(schema)}")
    return schema
