"""Our Idefics3Config from the metadata of llama.cpp's GGUF files (see gguf.py for the files' layout).

Text: `llama.*` gives the decoder's sizes, RoPE base and norm epsilon; the vocabulary size is token_embd's row
count; the head is tied when the file has no output tensor (llama.cpp then reads token_embd); bias tensors turn
on attention_bias / mlp_bias; a rope_freqs tensor is accepted only as llama3 rope scaling with its usual
parameters (checked against the factors it holds). eos ids: eos, eot and `<end_of_utterance>` where present.
Vision: `clip.vision.*` (SigLIP with GELU, as clip.cpp builds it for projector type idefics3). Without an mmproj
file: SmolVLM-256M's vision shapes and TEXT_ONLY (model/idefics3.py), since nothing in the text file says more.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from ..config import ConfigError, Idefics3Config, TextConfig, VisionConfig
from ..model.idefics3 import TEXT_ONLY
from .gguf_tensors import DENSE, GGUFError

TEXT_ARCH = "llama"
# SmolVLM-256M / 500M's vision tower: the shapes a text-only model's config carries (no weights behind them).
DEFAULT_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=512, patch_size=16)
DEFAULT_SCALE_FACTOR = 4


def _need(meta: dict[str, Any], key: str, path: Path) -> Any:
    if meta.get(key) is None:
        raise GGUFError(f"{path} lacks the metadata key {key!r}")
    return meta[key]


def _token_id(meta: dict[str, Any], name: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    return None if value is None else int(value)


def _eos_ids(meta: dict[str, Any], tokens: list[str]) -> list[int]:
    """eos, then end-of-turn and `<end_of_utterance>` where the vocabulary has them (SmolVLM ends turns with it)."""
    ids = [i for i in (_token_id(meta, "eos"), _token_id(meta, "eot")) if i is not None]
    if "<end_of_utterance>" in tokens:
        ids.append(tokens.index("<end_of_utterance>"))
    return list(dict.fromkeys(ids))


def _rope_scaling(meta: dict[str, Any], reader: GGUFReader, head_dim: int, theta: float, path: Path) -> dict | None:
    kind = meta.get("llama.rope.scaling.type")
    if kind not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {kind!r} is not supported (default RoPE or llama3's rope_freqs)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    factors = np.asarray(freqs.data, dtype=np.float64)
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expect = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192, scaling["factor"],
                                                          1 / ((1 - smooth) / scaling["factor"] + smooth)))
    if factors.shape != expect.shape or not np.allclose(factors, expect, rtol=1e-4):
        raise GGUFError(f"{path}: rope_freqs.weight is not llama3 rope scaling with its usual parameters "
                        "(low 1, high 4, original context 8192); it is not supported")
    return scaling


def _text_config(meta: dict[str, Any], reader: GGUFReader, path: Path) -> TextConfig:
    a = TEXT_ARCH
    shapes = {t.name: [int(d) for d in reversed(t.shape.tolist())] for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise GGUFError(f"{path} has no token_embd.weight tensor")
    hidden = int(_need(meta, f"{a}.embedding_length", path))
    heads = int(_need(meta, f"{a}.attention.head_count", path))
    head_dim = int(meta.get(f"{a}.attention.key_length") or hidden // heads)
    rope_dims = int(meta.get(f"{a}.rope.dimension_count") or head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"{path}: RoPE over {rope_dims} of {head_dim} head dimensions is not supported")
    theta = float(meta.get(f"{a}.rope.freq_base") or 10000.0)
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    try:
        return TextConfig(
            vocab_size=shapes["token_embd.weight"][0], hidden_size=hidden,
            intermediate_size=int(_need(meta, f"{a}.feed_forward_length", path)),
            num_hidden_layers=int(_need(meta, f"{a}.block_count", path)), num_attention_heads=heads,
            num_key_value_heads=int(meta.get(f"{a}.attention.head_count_kv") or heads), head_dim=head_dim,
            rms_norm_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon") or 1e-5), rope_theta=theta,
            rope_scaling=_rope_scaling(meta, reader, head_dim, theta, path),
            max_position_embeddings=int(meta.get(f"{a}.context_length") or 2048),
            attention_bias="blk.0.attn_q.bias" in shapes, mlp_bias="blk.0.ffn_up.bias" in shapes,
            bos_token_id=_token_id(meta, "bos"), eos_token_id=_eos_ids(meta, tokens) or None,
            pad_token_id=_token_id(meta, "padding"), tie_word_embeddings="output.weight" not in shapes)
    except ConfigError as err:
        raise GGUFError(f"{path}: {err}") from None


def _vision_config(meta: dict[str, Any], path: Path) -> tuple[VisionConfig, int]:
    v = "clip.vision"
    if meta.get("clip.use_silu"):
        raise GGUFError(f"{path}: a SiLU vision tower is not SigLIP's (Idefics3 uses GELU)")
    vision = VisionConfig(
        hidden_size=int(_need(meta, f"{v}.embedding_length", path)),
        intermediate_size=int(_need(meta, f"{v}.feed_forward_length", path)),
        num_hidden_layers=int(_need(meta, f"{v}.block_count", path)),
        num_attention_heads=int(_need(meta, f"{v}.attention.head_count", path)),
        image_size=int(_need(meta, f"{v}.image_size", path)), patch_size=int(_need(meta, f"{v}.patch_size", path)),
        layer_norm_eps=float(meta.get(f"{v}.attention.layer_norm_epsilon") or 1e-6))
    return vision, int(meta.get(f"{v}.projector.scale_factor") or 2)


def _dtype_name(kinds: Counter) -> str:
    """The load dtype "auto" means: the file's dense matrices' (F16, BF16), else bf16 for quantised weights
    (on CPUs without bf16 loading picks fp32), fp32 for an all-F32 file."""
    dense = [k for k in kinds if k in DENSE and k != GGMLQuantizationType.F32]
    if GGMLQuantizationType.BF16 in dense:
        return "bfloat16"
    if dense:
        return "float16"
    return "bfloat16" if any(k not in DENSE for k in kinds) else "float32"


def build_config(text_meta: dict[str, Any], text: GGUFReader, text_path: Path,
                 vision_meta: dict[str, Any] | None, mmproj_path: Path | None) -> Idefics3Config:
    """Our config from the two files' metadata (SmolVLM-256M's vision shapes and TEXT_ONLY without an mmproj)."""
    text_config = _text_config(text_meta, text, text_path)
    if vision_meta is None:
        vision, scale, extra = VisionConfig(**DEFAULT_VISION), DEFAULT_SCALE_FACTOR, {TEXT_ONLY: True}
    else:
        vision, scale = _vision_config(vision_meta, mmproj_path)
        extra = {}
        projection = vision_meta.get("clip.vision.projection_dim")
        if projection is not None and int(projection) != text_config.hidden_size:
            raise GGUFError(f"{mmproj_path} projects image features to {projection} dimensions but the text model "
                            f"{text_path} has hidden size {text_config.hidden_size}: the files do not belong together")
    tokens = list(text_meta.get("tokenizer.ggml.tokens") or [])
    # the id of <image>; a vocabulary without one (a plain text model) gets the id the processor will give it
    # when it adds its image tokens (<fake_token_around_image>, <image>, ... after the vocabulary)
    image_token = tokens.index("<image>") if "<image>" in tokens else len(tokens) + 1
    kinds = Counter(t.tensor_type for t in text.tensors)
    try:
        return Idefics3Config(vision_config=vision, text_config=text_config, scale_factor=scale,
                              image_token_id=image_token, tie_word_embeddings=text_config.tie_word_embeddings,
                              pad_token_id=text_config.pad_token_id, model_type="idefics3",
                              torch_dtype=_dtype_name(kinds), extra=extra)
    except ConfigError as err:
        raise GGUFError(f"{mmproj_path or text_path}: {err}") from None
