"""The tokenizer and processor of a llama.cpp GGUF model, from its files' metadata (or a tokenizer folder).

Tokenizer: `tokenizer.ggml.model` must be "gpt2" (byte-level BPE, as convert_hf_to_gguf.py writes SmolVLM's and
Idefics3's vocabularies). The vocabulary is `tokenizer.ggml.tokens` (id = position), the merges
`tokenizer.ggml.merges` ("a b" strings, rank = position); CONTROL tokens (token_type 3: the tokenizer.json's
special added tokens) become special added tokens, USER_DEFINED ones (4) plain added tokens, so they are matched
before BPE as transformers does. bos / eos / unk / pad come from the `*_token_id` keys, BOS / EOS insertion from
`add_bos_token` / `add_eos_token`, the chat template(s) from `tokenizer.chat_template(.NAME)`.

The pre-tokenizer follows `tokenizer.ggml.pre`, matched to the tokenizer.json the model was trained with:
- "smollm" (SmolLM / SmolLM2 / SmolVLM): llama.cpp splits with "\\p{N}" and then GPT-2's regex (its StarCoder
  rules: every digit alone). SmolVLM's tokenizer.json (tests/data/smolvlm-tokenizer) has GPT-2's byte-level
  pre-tokenizer only, and transformers rebuilds exactly that for its GPT2Tokenizer class, so that is what we
  build. The two agree except where a run of two or more whitespace characters meets a digit ("x  2": GPT-2
  gives "x", " ", " 2" -> x Ġ Ġ 2; llama.cpp gives "x", "  ", "2" -> x ĠĠ 2): we give the tokenizer.json's ids.
  The vocabulary has no token with more than one digit, so digit runs are single digits either way.
- "gpt2" / "gpt-2": the same byte-level pre-tokenizer.
- "llama-bpe" / "llama3" / "llama-v3" (Idefics3-8B's Llama 3 text model): Llama 3's split regex, then byte-level
  without its regex; merges are skipped for words in the vocabulary (ignore_merges) and BOS is added by default,
  as llama.cpp and Llama 3's tokenizer.json do.
Any other value is an error suggesting a tokenizer folder.

Processor: image settings from the mmproj's `clip.vision.*`: tile = image_size, longest edge =
preproc_image_size (written by recent converters; else 4 x the tile, SmolVLM's and Idefics3's ratio),
image_mean / image_std, image_seq_len = (image_size / patch_size)^2 / scale_factor^2. GGUF does not record, and
we take transformers' Idefics3 defaults for: LANCZOS resampling, splitting into tiles, rescale 1/255, padding,
RGB conversion; the tokenizer's padding side (left, as SmolVLM's) and model_max_length (the text model's context
length). Without an mmproj file: SmolVLM-256M's settings (the model then refuses images anyway).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import Tokenizer as Backend

from ..quant.gguf import GGUFError, read_metadata
from ..quant.gguf_config import DEFAULT_SCALE_FACTOR, DEFAULT_VISION
from . import chat_template as templates
from .image import ImageSettings
from .load import DEFAULT_TIMEOUT
from .processor import Idefics3Processor
from .tokenizer import Tokenizer, read_json

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3 = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
    {**_BYTE_LEVEL, "use_regex": False}]}
# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges, BOS added by default)
PRE_TOKENIZERS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "smollm": (_BYTE_LEVEL, False, False), "gpt2": (_BYTE_LEVEL, False, False), "gpt-2": (_BYTE_LEVEL, False, False),
    "llama-bpe": (_LLAMA3, True, True), "llama3": (_LLAMA3, True, True), "llama-v3": (_LLAMA3, True, True)}
_SPECIAL_IDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}  # ours -> tokenizer.ggml.*_token_id
_TOKENIZER_KEYS = frozenset({"padding_side", "truncation_side", "model_max_length", "add_bos_token", "add_eos_token"})
_IMAGE_KEYS = frozenset(ImageSettings.__dataclass_fields__)


def _token(tokens: list[str], meta: dict[str, Any], name: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{name}_token_id")
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None


def chat_templates(meta: dict[str, Any]) -> str | dict[str, str] | None:
    """`tokenizer.chat_template`, or a dict with "default" and the named `tokenizer.chat_template.NAME` ones."""
    default = meta.get("tokenizer.chat_template")
    named = {k.rsplit(".", 1)[1]: v for k, v in meta.items() if k.startswith("tokenizer.chat_template.")}
    if not named:
        return default
    return {**({"default": default} if default is not None else {}), **named}


def tokenizer_from_metadata(meta: dict[str, Any], source: str | Path = "the GGUF file",
                            **overrides: Any) -> Tokenizer:
    """Our Tokenizer from a GGUF text model's `tokenizer.*` metadata (see the module docstring). overrides:
    padding_side, truncation_side, model_max_length, add_bos_token, add_eos_token."""
    unknown = sorted(set(overrides) - _TOKENIZER_KEYS)
    if unknown:
        raise TypeError(f"unknown tokenizer option(s) {unknown}; valid: {sorted(_TOKENIZER_KEYS)}")
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{source}: tokenizer model {kind!r} is not supported (byte-level BPE, 'gpt2', is); pass "
                        "a folder with the model's tokenizer.json instead")
    pre = str(meta.get("tokenizer.ggml.pre", ""))
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{source}: pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)}); "
                        "pass a folder with the model's tokenizer.json instead")
    pre_tokenizer, ignore_merges, bos_default = PRE_TOKENIZERS[pre]
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    kinds = list(meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens))
    merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges") or []]
    if not tokens or len(kinds) != len(tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.tokens / token_type are missing or disagree in length")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": int(kind) == TokenType.CONTROL}
             for i, (token, kind) in enumerate(zip(tokens, kinds))
             if int(kind) in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}}
    try:
        backend = Backend.from_str(json.dumps(spec))
    except Exception as err:  # the Rust side raises plain Exception subclasses
        raise GGUFError(f"{source}: cannot build a tokenizer from its vocabulary: {err}") from err
    config: dict[str, Any] = {f"{ours}_token": tok for ours, theirs in _SPECIAL_IDS.items()
                              if (tok := _token(tokens, meta, theirs)) is not None}
    config.update({"padding_side": "left", "clean_up_tokenization_spaces": False,
                   "chat_template": chat_templates(meta),
                   "_add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", bos_default)),
                   "_add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))})
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if context:
        config["model_max_length"] = int(context)
    for key in ("add_bos_token", "add_eos_token"):
        if key in overrides:
            config[f"_{key}"] = bool(overrides.pop(key))
    config.update(overrides)
    return Tokenizer(backend, config)


def image_settings(meta: dict[str, Any]) -> tuple[ImageSettings, int]:
    """(image settings, image tokens per tile) from the mmproj's metadata (module docstring for the defaults)."""
    v = "clip.vision"
    if meta.get(f"{v}.image_size") is None:  # text only
        tile, patch, scale = DEFAULT_VISION["image_size"], DEFAULT_VISION["patch_size"], DEFAULT_SCALE_FACTOR
        longest, mean, std = 4 * tile, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        tile, patch = int(meta[f"{v}.image_size"]), int(meta[f"{v}.patch_size"])
        scale = int(meta.get(f"{v}.projector.scale_factor") or 2)
        longest = int(meta.get(f"{v}.preproc_image_size") or 4 * tile)
        mean = tuple(float(x) for x in meta.get(f"{v}.image_mean") or (0.5, 0.5, 0.5))
        std = tuple(float(x) for x in meta.get(f"{v}.image_std") or (0.5, 0.5, 0.5))
    settings = ImageSettings(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                             image_mean=mean, image_std=std)
    return settings, (tile // patch) ** 2 // scale ** 2


def processor_from_gguf(text_path: str | Path, mmproj_path: str | Path | None = None,
                        tokenizer: str | Path | None = None, **overrides: Any) -> Idefics3Processor:
    """The processor of a GGUF model: tokenizer and chat template from the text file's metadata (or from the
    folder `tokenizer`, holding tokenizer.json, when given), image settings from the mmproj file's. Keyword
    overrides as Idefics3Processor.from_pretrained's (size=, do_image_splitting=, image_seq_len=, padding_side=,
    chat_template=, max_pixels=, ...)."""
    valid = _IMAGE_KEYS | _TOKENIZER_KEYS | {"image_seq_len", "chat_template", "max_pixels", "load_timeout",
                                             "num_threads"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"unknown processor option(s) {unknown}; valid: {sorted(valid)}")
    meta = read_metadata(text_path, mmproj_path)
    token_options = {k: v for k, v in overrides.items() if k in _TOKENIZER_KEYS}
    if tokenizer is not None:
        folder = Path(tokenizer)
        backend = Tokenizer.from_folder(folder, **token_options)
        chat = templates.load_chat_template(folder, read_json(folder / "processor_config.json")) \
            or backend.chat_template or chat_templates(meta)
    else:
        backend = tokenizer_from_metadata(meta, text_path, **token_options)
        chat = backend.chat_template
    settings, seq_len = image_settings(meta)
    settings = settings.updated(**{k: v for k, v in overrides.items() if k in _IMAGE_KEYS})
    return Idefics3Processor(backend, settings, image_seq_len=overrides.get("image_seq_len", seq_len),
                             chat_template=overrides.get("chat_template") or chat,
                             max_pixels=overrides.get("max_pixels", -1),
                             load_timeout=overrides.get("load_timeout", DEFAULT_TIMEOUT),
                             num_threads=overrides.get("num_threads"))
