"""Typed configuration of an Idefics3 checkpoint, read from its config.json.

Field names equal the keys of config.json, so a config file reads as a table. Two layouts exist and
both load: the transformers 4.x layout of the Hub repositories (`text_config.rope_theta` and
`rope_scaling`, `torch_dtype`, vision `model_type` "idefics3" or "siglip_vision_model") and the 5.x
layout (`rope_parameters`, `dtype`, some keys written with a leading underscore). Unknown keys are
ignored (the SmolVLM configs carry leftovers such as `perceiver_config`); the sizes that define the
architecture are required, and a missing one is an error that names it. Defaults are those of
transformers' classes for the keys that have one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("idefics3", "smolvlm")
VISION_MODEL_TYPES = ("idefics3_vision", "idefics3", "siglip_vision_model", "smolvlm_vision")


class ConfigError(ValueError):
    """A config.json that cannot describe an Idefics3 model."""


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    model_type: str = "idefics3_vision"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = default RoPE
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"text_config.num_attention_heads ({self.num_attention_heads}) is not a multiple "
                              f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise ConfigError(f"text_config rope type {kind!r} is not supported (default, llama3)")
            self.rope_scaling = None if kind == "default" else {**self.rope_scaling, "rope_type": kind}


@dataclass
class Idefics3Config:
    vision_config: VisionConfig
    text_config: TextConfig
    scale_factor: int = 2
    image_token_id: int = 128257
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 128002
    model_type: str = "idefics3"
    torch_dtype: str | None = None  # the dtype the weights were saved in ("bfloat16", ...)
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, kept for save_pretrained

    def __post_init__(self) -> None:
        side = self.vision_config.patches_per_side
        if side % self.scale_factor:
            raise ConfigError(f"scale_factor {self.scale_factor} does not divide the patch grid side {side} "
                              f"(image_size {self.vision_config.image_size} // patch_size "
                              f"{self.vision_config.patch_size})")

    @property
    def image_seq_len(self) -> int:
        """Tokens per image tile: (image_size // patch_size)^2 / scale_factor^2."""
        return self.vision_config.patches_per_side ** 2 // self.scale_factor ** 2

    @property
    def connector_input_size(self) -> int:
        return self.vision_config.hidden_size * self.scale_factor ** 2

    # ---- reading ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Idefics3Config:
        raw = _strip_underscores(raw)
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type' (expected one of: idefics3, smolvlm)")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json model_type {model_type!r} is not an Idefics3 model "
                              f"(expected one of: {', '.join(MODEL_TYPES)})")
        for key in ("vision_config", "text_config"):
            if not isinstance(raw.get(key), dict):
                raise ConfigError(f"config.json is missing required key {key!r}")
        vision = _build(VisionConfig, raw["vision_config"], "vision_config")
        if vision.model_type not in VISION_MODEL_TYPES:
            raise ConfigError(f"vision_config.model_type {vision.model_type!r} is not a SigLIP/Idefics3 vision "
                              f"model (expected one of: {', '.join(VISION_MODEL_TYPES)})")
        text_raw = _strip_underscores(raw["text_config"])
        text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        text = _build(TextConfig, _rope_fields(text_raw), "text_config")
        top = {k: raw[k] for k in ("scale_factor", "image_token_id", "tie_word_embeddings", "pad_token_id")
               if k in raw}
        dtype = raw.get("torch_dtype", raw.get("dtype"))
        known = {f.name for f in dataclasses.fields(cls)} | {"dtype"}
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(vision_config=vision, text_config=text, model_type=model_type, torch_dtype=dtype,
                   extra=extra, **top)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Idefics3Config:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{str(folder)!r} is not a checkpoint folder: no config.json in it")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_dict(raw)

    # ---- writing (the 5.x layout that transformers writes today) ---------------------------------
    def to_dict(self) -> dict[str, Any]:
        text = dataclasses.asdict(self.text_config)
        rope = {"rope_theta": text.pop("rope_theta"), "rope_type": "default"}
        scaling = text.pop("rope_scaling")
        if scaling:
            rope.update({k: v for k, v in scaling.items() if k != "type"})
        text["rope_parameters"] = rope
        out = {**self.extra, "architectures": ["Idefics3ForConditionalGeneration"], "model_type": self.model_type,
               "vision_config": dataclasses.asdict(self.vision_config), "text_config": text,
               "scale_factor": self.scale_factor, "image_token_id": self.image_token_id,
               "tie_word_embeddings": self.tie_word_embeddings, "pad_token_id": self.pad_token_id}
        if self.torch_dtype:
            out["dtype"] = self.torch_dtype
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _strip_underscores(raw: dict) -> dict:
    """5.x writes some keys with a leading underscore (`_pad_token_id`); read them as the plain key."""
    out = dict(raw)
    for key in list(raw):
        if key.startswith("_") and not key.startswith("__") and key[1:] not in raw:
            out[key[1:]] = out.pop(key)
    return out


def _rope_fields(text: dict) -> dict:
    """Map 5.x `rope_parameters` and 4.x `rope_theta`/`rope_scaling` onto (rope_theta, rope_scaling)."""
    text = dict(text)
    params = text.pop("rope_parameters", None)
    if params:
        params = dict(params)
        if "rope_theta" in params:
            text["rope_theta"] = params.pop("rope_theta")
        kind = params.get("rope_type", params.get("type", "default"))
        text["rope_scaling"] = None if kind == "default" else params
    return text


def _build(cls: type, raw: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in names.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if raw.get(n) is None]
    if missing:
        raise ConfigError(f"config.json {where} is missing required key(s): {', '.join(missing)}")
    kwargs = {k: v for k, v in raw.items() if k in names}
    for name, f in names.items():  # reject wrong types early with the key's name
        if name in kwargs and f.type in ("int", "float") and not isinstance(kwargs[name], (int, float)):
            raise ConfigError(f"config.json {where}.{name} must be a number, got {kwargs[name]!r}")
    return cls(**kwargs)


