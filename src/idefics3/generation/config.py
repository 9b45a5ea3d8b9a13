"""Generation settings: the `generation_config.json` of a checkpoint, merged with per-call overrides.

Field names and defaults follow transformers' `GenerationConfig`, so that `model.generate(**inputs,
max_new_tokens=..., do_sample=True, top_p=...)` means what it means there: greedy unless `do_sample`,
20 new tokens when nothing sets a length, top_k 50 when sampling without an explicit top_k.

One deliberate difference: the stop ids always include `<end_of_utterance>` when the checkpoint's
tokenizer defines it. Fine-tuned Idefics3/SmolVLM checkpoints often ship a generation_config.json
whose eos list forgets it (an older SmolVLM-500M revision had eos 2 only), and then generation runs
on past the end of the answer; the chat template ends every turn with that token, so it is always a
correct place to stop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the network class, for type hints only
    from ..model.idefics3 import Idefics3

logger = logging.getLogger(__name__)

END_OF_UTTERANCE = "<end_of_utterance>"
DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default max_length=20 means "20 new tokens" when nothing is set
_ADDED_TOKEN = re.compile(r'\{\s*"id"\s*:\s*(\d+)\s*,\s*"content"\s*:\s*"' + re.escape(END_OF_UTTERANCE) + '"')


@dataclass
class GenerationConfig:
    """How to decode; `None` for a length field means "not set" (see `max_new_tokens_for`)."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens, as in transformers; max_new_tokens wins when both are set
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # only used when sampling; 0 disables
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys of the json, kept verbatim

    def __post_init__(self) -> None:
        self.eos_token_id = _as_id_list(self.eos_token_id)
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on settings that transformers would also reject."""
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens is None or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} "
                             "(for greedy decoding set do_sample=False)")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationConfig:
        """Build from a generation_config.json dict; `null` values keep the defaults, unknown keys go to extra."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names and v is not None}
        extra = {k: v for k, v in raw.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> GenerationConfig:
        """Read `folder/generation_config.json` (defaults when absent) and add `<end_of_utterance>` to the eos ids."""
        folder = Path(folder)
        path = folder / "generation_config.json"
        raw: dict[str, Any] = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read {path}: {err}") from err
        config = cls.from_dict(raw)
        eou = end_of_utterance_id(folder)
        if eou is not None and eou not in config.eos_token_id:
            if raw:
                logger.info("%s: eos_token_id %s lacks %s (%d); stopping there too", path, config.eos_token_id,
                            END_OF_UTTERANCE, eou)
            config.eos_token_id = [*config.eos_token_id, eou]
        return config

    @classmethod
    def for_model(cls, model: Idefics3) -> GenerationConfig:
        """The model's defaults: its checkpoint's generation_config.json, else the text config's ids."""
        text = model.config.text_config
        folder = getattr(model, "checkpoint_dir", None)
        config = cls.from_pretrained(folder) if folder is not None else cls()
        if not config.eos_token_id:
            config.eos_token_id = _as_id_list(text.eos_token_id)
        if config.pad_token_id is None:
            config.pad_token_id = text.pad_token_id
        if config.bos_token_id is None:
            config.bos_token_id = text.bos_token_id
        return config

    def update(self, **overrides: Any) -> GenerationConfig:
        """A copy with the given fields replaced; `None` values are ignored, unknown names raise TypeError."""
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(unknown)}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    # ---- derived ----------------------------------------------------------------------------------
    def max_new_tokens_for(self, prompt_len: int, max_positions: int | None = None) -> int:
        """New tokens allowed after a (padded) prompt of `prompt_len`, with transformers' precedence."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(0, self.max_length - prompt_len)
        limit = prompt_len + DEFAULT_MAX_NEW_TOKENS
        if max_positions is not None:
            limit = min(limit, max_positions)
        return max(0, limit - prompt_len)

    @property
    def resolved_pad_token_id(self) -> int:
        """The id that fills finished rows: pad, else the first eos (as transformers does), else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0


def end_of_utterance_id(folder: str | Path) -> int | None:
    """The id of `<end_of_utterance>` in the checkpoint's tokenizer files, or None if it has none."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            decoder = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        except (OSError, json.JSONDecodeError):
            decoder = {}
        for key, token in decoder.items():
            if isinstance(token, dict) and token.get("content") == END_OF_UTTERANCE:
                return int(key)
    tokenizer_path = folder / "tokenizer.json"
    if tokenizer_path.is_file():
        try:
            match = _ADDED_TOKEN.search(tokenizer_path.read_text(encoding="utf-8"))
        except OSError:
            return None
        if match:
            return int(match.group(1))
    return None


def _as_id_list(value: int | list[int] | tuple[int, ...] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
