"""Text tokenizer: a thin layer over `tokenizers.Tokenizer` that behaves like transformers' fast tokenizer.

The `tokenizers` library does the actual work (normalising, pre-tokenising, BPE, added tokens, the post-processor
that adds BOS, decoding). This module only reproduces the rules transformers (v5, `TokenizersBackend`) applies on
top when it loads a folder, so that the same folder gives the same ids:

- `tokenizer.json` is the source of truth; its post-processor decides the BOS/EOS added by
  `add_special_tokens=True` (`add_bos_token`/`add_eos_token` in the config are ignored when tokenizer.json exists;
  a missing post-processor adds nothing). A config declaring `GPT2Tokenizer` gets that class's pipeline (byte-level
  pre-tokeniser and decoder, no normaliser, plain BPE options), as transformers rebuilds it.
- special tokens come from `tokenizer_config.json` (then `special_tokens_map.json` on the legacy path); named
  special tokens and extra special tokens missing from the added vocabulary are added.
- padding (side from the config; left for Idefics3/SmolVLM), truncation, `attention_mask`, and decoding with
  `skip_special_tokens` and the config's `clean_up_tokenization_spaces` (skipped for BPE, as in v5).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GPT2_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")
_GPT2_DEFAULTS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
_PADDING = {"do_not_pad", "longest", "max_length"}
_TRUNCATION = {"do_not_truncate", "longest_first", "only_first", "only_second"}
_VERY_LARGE = int(1e20)


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as a serialised AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_token(value: Any, special: bool = True) -> AddedToken:
    if isinstance(value, dict):
        fields = {k: v for k, v in value.items() if k in ("single_word", "lstrip", "rstrip", "normalized", "special")}
        return AddedToken(value["content"], **fields)
    return AddedToken(value, special=special)


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict ({} when the file does not exist); invalid JSON names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


class Tokenizer:
    """Tokenizer for one checkpoint folder; call it on text, `decode` ids back."""

    def __init__(self, backend: Backend, config: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self._lock = threading.Lock()
        cfg = self.config
        padding, truncation = backend.padding, backend.truncation
        backend.no_padding()
        backend.no_truncation()
        if cfg.get("tokenizer_class") in _GPT2_CLASSES:
            self._use_gpt2_pipeline()
            for key, value in _GPT2_DEFAULTS.items():
                cfg.setdefault(key, value)
        if padding and cfg.get("pad_token") is None:
            cfg["pad_token"] = padding["pad_token"]
        self.padding_side: str = cfg.get("padding_side") or (padding or {}).get("direction") or "right"
        self.truncation_side: str = cfg.get("truncation_side") or "right"
        for side in (self.padding_side, self.truncation_side):
            if side not in ("left", "right"):
                raise ValueError(f"padding/truncation side must be 'left' or 'right', got {side!r}")
        self.model_max_length: int = cfg.get("model_max_length") or _VERY_LARGE
        self.default_max_length: int | None = (truncation or {}).get("max_length")
        self.model_input_names: list[str] = list(cfg.get("model_input_names") or ["input_ids", "attention_mask"])
        self.clean_up_tokenization_spaces: bool = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # saved as [{"name": ..., "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}
        # Named special tokens: the standard ones first, then model-specific `*_token` keys (e.g. image_token).
        named = [k for k in NAMED_SPECIAL_TOKENS if k in cfg]
        named += [k for k, v in cfg.items() if k.endswith("_token") and k not in named and isinstance(v, (str, dict))]
        self.special_tokens: dict[str, str] = {
            k: _token_content(cfg[k]) for k in named if _token_content(cfg[k]) is not None}
        extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # model-specific named tokens
            self.special_tokens.update({k: _token_content(v) for k, v in extra.items()})
            extra = []
        self.extra_special_tokens: list[str] = [_token_content(t) for t in extra]
        self._add_missing_tokens(cfg.get("added_tokens_decoder") or {},
                                 [cfg[k] for k in self.special_tokens if k in cfg] + list(extra))
        if cfg.get("_add_bos_token") is not None or cfg.get("_add_eos_token") is not None or \
                backend.post_processor is None:
            self._set_bos_eos(bool(cfg.get("_add_bos_token")), bool(cfg.get("_add_eos_token")))

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides: Any) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) from a checkpoint folder.

        Overrides: padding_side, truncation_side, model_max_length, add_bos_token, add_eos_token, chat_template."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}; this implementation needs the fast-tokenizer "
                                    "file (transformers writes it with save_pretrained)")
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        special_map = folder / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and special_map.is_file():
            for key, value in read_json(special_map).items():  # legacy files override the config
                if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                    merged = list(config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])
                    merged += [v for v in value if v not in merged]
                    config.pop("additional_special_tokens", None)
                    config["extra_special_tokens"] = merged
                else:
                    config[key] = value
        valid = {"padding_side", "truncation_side", "model_max_length", "add_bos_token", "add_eos_token",
                 "chat_template"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"unknown tokenizer option(s) {unknown}; valid: {sorted(valid)}")
        for key in ("add_bos_token", "add_eos_token"):  # honoured only when asked for explicitly
            if key in overrides:
                config[f"_{key}"] = overrides.pop(key)
        config.update(overrides)
        try:
            backend = Backend.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise ValueError(f"cannot read {path}: {err}") from err
        return cls(backend, config)

    def _use_gpt2_pipeline(self) -> None:
        """transformers' GPT2Tokenizer rebuilds the pipeline from vocab and merges; do the same in place."""
        model = self.backend.model
        if type(model).__name__ == "BPE":
            model.dropout, model.unk_token, model.fuse_unk = None, None, False
            model.continuing_subword_prefix, model.end_of_word_suffix = "", ""
            model.byte_fallback, model.ignore_merges = False, False
        self.backend.normalizer = None
        prefix = bool(self.config.get("add_prefix_space"))
        self.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
        self.backend.decoder = decoders.ByteLevel()

    def _add_missing_tokens(self, declared: dict[str, Any], special: list[Any]) -> None:
        current = {t.content: t for t in self.backend.get_added_tokens_decoder().values()}
        for _, value in sorted(declared.items(), key=lambda item: int(item[0])):
            token = _added_token(value)
            if repr(current.get(token.content)) != repr(token):
                self.backend.add_tokens([token])
        current = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        missing = [_added_token(v) for v in special if _token_content(v) not in current]
        if missing:
            self.backend.add_tokens(missing)

    def _set_bos_eos(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.bos_token if add_bos else None, self.eos_token if add_eos else None
        single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
        pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
        specials = [(t, self.backend.token_to_id(t)) for t in (bos, eos) if t]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Register `tokens` as extra special tokens (added to the vocabulary when missing), as processors do."""
        self.backend.add_special_tokens(
            [AddedToken(t, rstrip=False, lstrip=False, normalized=False, special=True) for t in tokens])
        self.extra_special_tokens = list(tokens)

    # ------------------------------------------------------------------------------------------ vocabulary

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def token(self, name: str) -> str | None:
        return self.special_tokens.get(name)

    bos_token = property(lambda self: self.token("bos_token"))
    eos_token = property(lambda self: self.token("eos_token"))
    unk_token = property(lambda self: self.token("unk_token"))
    pad_token = property(lambda self: self.token("pad_token"))
    bos_token_id = property(lambda self: self._id_or_none(self.bos_token))
    eos_token_id = property(lambda self: self._id_or_none(self.eos_token))
    unk_token_id = property(lambda self: self._id_or_none(self.unk_token))
    pad_token_id = property(lambda self: self._id_or_none(self.pad_token))

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.convert_tokens_to_ids(token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (bos_token, eos_token, ...), as chat templates see them."""
        return dict(self.special_tokens)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens.values(), *self.extra_special_tokens]))

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Id of a token (or of each token); the unknown token's id (None if there is none) when absent."""
        if isinstance(tokens, str):
            index = self.backend.token_to_id(tokens)
            if index is None and self.unk_token is not None and tokens != self.unk_token:
                return self.backend.token_to_id(self.unk_token)
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    # ------------------------------------------------------------------------------------------ encoding

    def _strategies(self, padding: Any, truncation: Any, max_length: int | None,
                    pad_to_multiple_of: int | None) -> tuple[str, str, int | None]:
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        pad = "longest" if padding is True else "do_not_pad" if padding in (False, None) else str(padding)
        trunc = "longest_first" if truncation is True else \
            "do_not_truncate" if truncation in (False, None) else str(truncation)
        if pad not in _PADDING:
            raise ValueError(f"padding must be True, False or one of {sorted(_PADDING)}, got {padding!r}")
        if trunc not in _TRUNCATION:
            raise ValueError(f"truncation must be True, False or one of {sorted(_TRUNCATION)}, got {truncation!r}")
        if max_length is None:
            if pad == "max_length":
                pad = "do_not_pad" if self.model_max_length >= _VERY_LARGE else pad
                max_length = None if pad == "do_not_pad" else self.model_max_length
            if trunc != "do_not_truncate":
                trunc = "do_not_truncate" if self.model_max_length >= _VERY_LARGE else trunc
                max_length = None if trunc == "do_not_truncate" else self.model_max_length
        if pad != "do_not_pad" and self.pad_token_id is None:
            raise ValueError("asked to pad, but the tokenizer has no pad_token (set one in tokenizer_config.json)")
        if trunc != "do_not_truncate" and pad != "do_not_pad" and pad_to_multiple_of and max_length and \
                max_length % pad_to_multiple_of:
            raise ValueError(f"truncation length ({max_length}) is not a multiple of pad_to_multiple_of "
                             f"({pad_to_multiple_of})")
        return pad, trunc, max_length

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_attention_mask: bool | None = None,
                 return_token_type_ids: bool | None = None) -> dict[str, list]:
        """Encode one text (lists of ints) or a batch (lists of lists), with padding and truncation."""
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        pad, trunc, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        with self._lock:
            if trunc != "do_not_truncate":
                self.backend.enable_truncation(max_length, stride=0, strategy=trunc, direction=self.truncation_side)
            try:
                encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            finally:
                self.backend.no_truncation()
        out: dict[str, list] = {"input_ids": [e.ids for e in encodings]}
        if return_token_type_ids or (return_token_type_ids is None and "token_type_ids" in self.model_input_names):
            out["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask or (return_attention_mask is None and "attention_mask" in self.model_input_names):
            out["attention_mask"] = [e.attention_mask for e in encodings]
        if pad != "do_not_pad":
            self._pad(out, max_length if pad == "max_length" else None, pad_to_multiple_of,
                      padding_side or self.padding_side)
        return out if batched else {key: value[0] for key, value in out.items()}

    def _pad(self, out: dict[str, list], length: int | None, multiple: int | None, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        target = length if length is not None else max(len(ids) for ids in out["input_ids"])
        if multiple and target % multiple:
            target += multiple - target % multiple
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        for key, rows in out.items():
            for i, row in enumerate(rows):
                extra = [fill[key]] * (target - len(row))
                rows[i] = extra + row if side == "left" else row + extra

    # ------------------------------------------------------------------------------------------ decoding

    def decode(self, ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """Text of one sequence of ids, or a list of texts for a batch (list of lists, 2-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], (list, tuple)):
            return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]
        return self._decode_one(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else list(sequences)
        return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        if clean_up and (type(self.backend.model).__name__ != "BPE" or self.config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")):
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    # ------------------------------------------------------------------------------------------ saving

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (transformers can load the result)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if not k.startswith("_") and k != "chat_template"}
        config.pop("extra_special_tokens", None)
        config["additional_special_tokens"] = list(self.extra_special_tokens)
        config["padding_side"] = self.padding_side
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
