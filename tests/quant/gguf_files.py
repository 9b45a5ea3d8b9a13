"""Tiny GGUF pairs written the way llama.cpp's convert_hf_to_gguf.py writes SmolVLM / Idefics3, for the GGUF tests.

The text model: architecture "llama" with TextModel/LlamaModel's metadata, the vocabulary as _set_vocab_gpt2
writes it (tokens in id order, added special tokens as CONTROL, gguf.SpecialVocab for merges, special ids,
add_bos_token and the chat template) with pre-tokenizer "smollm", tensor names from the gguf package's tables
applied to the keys with "text_model." dropped, and LlamaModel.permute applied to q_proj / k_proj. The vision
projector: architecture "clip", MmprojModel + SmolVLMModel's metadata (projector type idefics3), ".embeddings."
tensors forced to F32, other 1-D tensors F32. Each matrix takes the GGML type `types` gives its GGUF name
(default F16 for 2-D tensors, F32 for 1-D), quantised with gguf.quants, or, for K-quants it cannot make,
blocks built here. `meaning` returns, under our keys, the tensors the file stands for (gguf.quants.dequantize,
permutation undone): the weights of the dense reference model.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from checkpoints import SMOLVLM_TOKENIZER

TEXT_PREFIX = "model.text_model."


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """LlamaModel.permute (convert_hf_to_gguf.py) with n_head already the right count."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(kind: T, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random but well-scaled Q4_K / Q6_K blocks [N, K/256 * bytes] (gguf.quants cannot make K-quants)."""
    rng = np.random.default_rng(seed)
    n, k = shape
    blocks = n * k // 256

    def half(value: float) -> np.ndarray:
        return np.full((blocks, 1), value, np.float16).view(np.uint8)

    if kind == T.Q4_K:  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        parts = [half(0.002), half(0.001), rng.integers(0, 256, (blocks, 12), np.uint8),
                 rng.integers(0, 256, (blocks, 128), np.uint8)]
    elif kind == T.Q6_K:  # ql 128, qh 64, 16 int8 scales, d
        parts = [rng.integers(0, 256, (blocks, 128), np.uint8), rng.integers(0, 256, (blocks, 64), np.uint8),
                 rng.integers(-64, 64, (blocks, 16)).astype(np.int8).view(np.uint8), half(0.001)]
    else:
        raise ValueError(kind)
    return np.concatenate(parts, axis=1).reshape(n, -1)


def encode(w: np.ndarray, kind: T, seed: int = 0) -> np.ndarray:
    """The stored form of a float array in a GGML type."""
    if kind == T.F32:
        return w.astype(np.float32)
    if kind == T.F16:
        return w.astype(np.float16)
    if kind in (T.Q4_K, T.Q6_K):
        return k_quant_blocks(kind, w.shape, seed)
    return quantize(w.astype(np.float32), kind)


def decode(stored: np.ndarray, kind: T, shape: tuple[int, ...]) -> np.ndarray:
    if kind in (T.F32, T.F16):
        return stored.astype(np.float32).reshape(shape)
    return dequantize(stored, kind).reshape(shape)


def _text_name(key: str, names) -> str:
    return names.get_name("model." + key[len(TEXT_PREFIX):] if key.startswith(TEXT_PREFIX) else key,
                          try_suffixes=(".weight", ".bias"))


def _vocab(writer: gguf.GGUFWriter, vocab_size: int, folder: Path = SMOLVLM_TOKENIZER, pre: str = "smollm") -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    reverse = {i: tok for tok, i in spec["model"]["vocab"].items()}
    added = {t["id"]: t for t in spec["added_tokens"]}
    reverse.update({i: t["content"] for i, t in added.items()})
    tokens, kinds = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            kinds.append(gguf.TokenType.CONTROL if i in added and added[i]["special"] else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def write_text(path: Path, state: dict[str, torch.Tensor], config, types: dict[str, T] | None = None,
               tied: bool = False, arch: str = "llama", pre: str = "smollm") -> dict[str, np.ndarray]:
    """The text model of `state` (our keys, fp32) as a GGUF file; returns what each of our keys means in it."""
    t = config.text_config
    types = types or {}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("tiny smolvlm")
    writer.add_block_count(t.num_hidden_layers)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(t.num_attention_heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_vocab_size(t.vocab_size)
    writer.add_rope_dimension_count(t.head_dim)
    _vocab(writer, t.vocab_size, pre=pre)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, t.num_hidden_layers)
    meaning = {}
    for seed, (key, tensor) in enumerate(state.items()):
        if not key.startswith((TEXT_PREFIX, "lm_head.")) or (tied and key.startswith("lm_head.")):
            continue
        w = tensor.detach().float().numpy()
        heads = t.num_attention_heads if "q_proj" in key else t.num_key_value_heads if "k_proj" in key else None
        if heads:
            w = permute(w, heads)
        name = _text_name(key, names)
        kind = types.get(name, T.F16 if w.ndim > 1 else T.F32)
        stored = encode(w, kind, seed)
        writer.add_tensor(name, stored, raw_dtype=None if kind in (T.F32, T.F16) else kind)
        back = decode(stored, kind, w.shape)
        meaning[key] = unpermute(back, heads) if heads else back
    if tied:
        meaning["lm_head.weight"] = meaning["model.text_model.embed_tokens.weight"]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return meaning


def write_mmproj(path: Path, state: dict[str, torch.Tensor], config, types: dict[str, T] | None = None,
                 projector: str = "idefics3", projection_dim: int | None = None,
                 longest_edge: int | None = None) -> dict[str, np.ndarray]:
    """The vision tower and connector of `state` as an mmproj GGUF file; returns what our keys mean in it."""
    v = config.vision_config
    types = types or {}
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(projection_dim or config.text_config.hidden_size)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.num_hidden_layers)
    writer.add_vision_head_count(v.num_attention_heads)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_clip_projector_type(projector)
    writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    writer.add_vision_projector_scale_factor(config.scale_factor)
    writer.add_vision_use_gelu(True)
    writer.add_vision_preproc_image_size(longest_edge or 2 * v.image_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, v.num_hidden_layers)
    meaning = {}
    for seed, (key, tensor) in enumerate(state.items()):
        if not key.startswith(("model.vision_model.", "model.connector.")):
            continue
        w = tensor.detach().float().numpy()
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        kind = T.F32 if ".embeddings." in key or w.ndim == 1 else types.get(name, T.F16)
        stored = encode(w, kind, seed)
        writer.add_tensor(name, stored, raw_dtype=None if kind in (T.F32, T.F16) else kind)
        meaning[key] = decode(stored, kind, w.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return meaning


def write_bare(path: Path, arch: str, **strings: str) -> Path:
    """A GGUF file with only an architecture and a few string keys (for the wrong-file errors)."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in strings.items():
        writer.add_string(key.replace("__", "."), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
