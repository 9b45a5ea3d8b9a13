"""llama.cpp's GGUF files of SmolVLM / Idefics3 -> our config, checkpoint keys and quantised formats.

llama.cpp keeps such a model in two files, as its convert_hf_to_gguf.py writes them:
- the text model: architecture "llama", metadata `llama.*` (block_count, embedding_length, feed_forward_length,
  attention.head_count(_kv), attention.layer_norm_rms_epsilon, rope.freq_base, context_length, ...) and
  `tokenizer.*`, tensors token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm/ffn_norm, output_norm
  and, when the head is not tied to the embeddings, output. The converter permutes the rows of attn_q / attn_k
  within each head for its RoPE kernel (LlamaModel.permute); gguf_tensors.unpermute_rows undoes it.
- the vision projector ("mmproj"): architecture "clip", `clip.projector_type` "idefics3", metadata
  `clip.vision.*` (image_size, patch_size, embedding_length, feed_forward_length, block_count,
  attention.head_count, attention.layer_norm_epsilon, projector.scale_factor, image_mean/std,
  preproc_image_size), tensors v.patch_embd, v.position_embd, v.blk.N.attn_q/k/v/out, ln1, ln2, ffn_up/down,
  v.post_ln and mm.model.fc (the connector).

Tensor names come from the gguf package's own tables (TensorNameMap), applied to our checkpoint keys the way the
converter applies them to the Hub's (it drops "text_model." from the text keys); the config comes from the
metadata (gguf_config.py). Matrices of the modules our policy quantises (quant/apply.py, vision included) keep
their GGUF quantisation in our formats (gguf_tensors.py); everything else is dense. Without an mmproj file the
model is text only (model/idefics3.py). Every problem is a GGUFError (a QuantError, so a ValueError) naming the
file, and the tensor where there is one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFReader, get_tensor_name_map

from ..config import Idefics3Config
from ..model.idefics3 import Idefics3
from ..weights import no_init
from . import gguf_tensors
from .apply import EMBED, HEAD, QuantConfig, plan
from .format import QuantSpec
from .gguf_config import TEXT_ARCH, build_config
from .gguf_tensors import GGUFError

log = logging.getLogger(__name__)

CLIP_ARCH, PROJECTOR = "clip", "idefics3"
_TEXT_PREFIX = "model.text_model."
_SUFFIXES = (".weight", ".bias")


@dataclass
class GGUFCheckpoint:
    """What read_gguf found. tensors: our checkpoint keys -> tensors, quantised matrices as
    `<module>.qweight/.scales(/.mins)`, dense ones as stored (F32/F16/BF16, or fp32 where dequantised); a tied
    head has no `lm_head.*` entries (it is the embedding). quantization: the quantised modules (none for an
    all-dense file). metadata: the files' key/values (the text file's, then the mmproj's `clip.*`)."""

    config: Idefics3Config
    tensors: dict[str, torch.Tensor]
    quantization: QuantConfig
    metadata: dict[str, Any]
    files: tuple[Path, Path | None]
    requantised: dict[str, str] = field(default_factory=dict)  # key -> the GGUF type that was requantised


class _Reader(GGUFReader):
    """GGUFReader that names the tensor whose type the gguf package does not know (it would say only the number),
    and parses from a plain ndarray view of its memory map: numpy's memmap subclass costs ~10 us per slice, and
    the reader slices a few hundred thousand times for a 49k-token vocabulary (5 s -> 1 s)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(path, "c")  # a private copy-on-write map: tensors are writable views, the file is not

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._map = value  # keeps the mapping open
        self._plain = value.view(np.ndarray)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        known = {int(t) for t in GGMLQuantizationType}
        for f in fields:
            kind = int(f.parts[4][0])
            if kind not in known:
                name = bytes(f.parts[1]).decode("utf-8", "replace")
                raise GGUFError(f"{self._path}: tensor {name} has GGML type {kind}, an unknown quantisation type "
                                "(not one the gguf package knows)")
        super()._build_tensors(start_offs, fields)


def open_gguf(path: str | Path) -> GGUFReader:
    """Open a GGUF file; GGUFError for anything that is not a readable GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return _Reader(path)
    except GGUFError:
        raise
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, OverflowError) as err:
        raise GGUFError(f"cannot read {path}: it is not a GGUF file, or it is truncated or corrupt ({err})") from err


def fields(reader: GGUFReader) -> dict[str, Any]:
    """The file's metadata as plain Python values (the reader's own GGUF.* entries left out)."""
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _architecture(meta: dict[str, Any]) -> str:
    return str(meta.get("general.architecture", ""))


def check_text(path: Path, meta: dict[str, Any]) -> None:
    arch = _architecture(meta)
    if arch == CLIP_ARCH:
        raise GGUFError(f"{path} is a vision projector (mmproj) file, not a text model: give the text model's "
                        ".gguf as the model and this file as mmproj")
    if arch != TEXT_ARCH:
        raise GGUFError(f"{path} is a GGUF of architecture {arch!r}; the text model of Idefics3 / SmolVLM is a "
                        f"{TEXT_ARCH!r} GGUF")


def check_mmproj(path: Path, meta: dict[str, Any]) -> None:
    arch = _architecture(meta)
    if arch != CLIP_ARCH:
        what = "a text model" if arch == TEXT_ARCH else f"a GGUF of architecture {arch!r}"
        raise GGUFError(f"{path} is {what}, not a vision projector (mmproj) file (architecture {CLIP_ARCH!r})")
    projector = meta.get("clip.projector_type", meta.get("clip.vision.projector_type"))
    if projector != PROJECTOR:
        raise GGUFError(f"{path} is a vision projector of type {projector!r}; Idefics3 / SmolVLM's is "
                        f"{PROJECTOR!r}")
    if meta.get("clip.has_vision_encoder") is False:
        raise GGUFError(f"{path} has no vision encoder")


def read_metadata(text_path: str | Path, mmproj_path: str | Path | None = None) -> dict[str, Any]:
    """Both files' metadata, checked to be a text model and an Idefics3 projector (the tokenizer and the
    processor read it): the text file's keys, then the mmproj's `clip.*` keys."""
    text_path = Path(text_path)
    meta = fields(open_gguf(text_path))
    check_text(text_path, meta)
    if mmproj_path is not None:
        vision = fields(open_gguf(mmproj_path))
        check_mmproj(Path(mmproj_path), vision)
        meta.update({k: v for k, v in vision.items() if k.startswith("clip.")})
    return meta


# ---- tensors ------------------------------------------------------------------------------------------
def _gguf_name(key: str, text_map: Any, vision_map: Any) -> str | None:
    """The GGUF name of one of our checkpoint keys, by the gguf package's tables."""
    if key.startswith(_TEXT_PREFIX):
        return text_map.get_name("model." + key[len(_TEXT_PREFIX):], try_suffixes=_SUFFIXES)
    if key.startswith(HEAD + "."):
        return text_map.get_name(key, try_suffixes=_SUFFIXES)
    return None if vision_map is None else vision_map.get_name(key, try_suffixes=_SUFFIXES)


def _heads_to_unpermute(key: str, config: Any) -> int | None:
    """Heads whose q/k rows llama.cpp permuted in this text tensor (None for every other tensor)."""
    if not key.startswith(_TEXT_PREFIX):
        return None
    t = config.text_config
    if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return t.num_attention_heads
    if key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return t.num_key_value_heads
    return None


def _summary(path: Path, kinds: Counter) -> str:
    return f"{path.name} (" + ", ".join(f"{n} x {k.name}" for k, n in kinds.most_common()) + ")"


def read_gguf(text_path: str | Path, mmproj_path: str | Path | None = None) -> GGUFCheckpoint:
    """Read a GGUF text model and, optionally, its Idefics3 vision projector (see the module docstring)."""
    text_path = Path(text_path)
    mmproj_path = None if mmproj_path is None else Path(mmproj_path)
    text = open_gguf(text_path)
    text_meta = fields(text)
    check_text(text_path, text_meta)
    vision = vision_meta = None
    if mmproj_path is not None:
        vision = open_gguf(mmproj_path)
        vision_meta = fields(vision)
        check_mmproj(mmproj_path, vision_meta)
    config = build_config(text_meta, text, text_path, vision_meta, mmproj_path)
    with no_init():
        model = Idefics3(config)  # on the meta device: our keys and shapes, nothing allocated
    quantisable = set(plan(model, include_vision=True).modules)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected = {k: v for k, v in expected.items() if not k.startswith(HEAD + ".")}

    t = config.text_config
    text_map = get_tensor_name_map(MODEL_ARCH.LLAMA, t.num_hidden_layers)
    vision_map = None if vision is None else \
        get_tensor_name_map(MODEL_ARCH.MMPROJ, config.vision_config.num_hidden_layers)
    stored = {tensor.name: (tensor, text_path) for tensor in text.tensors}
    if vision is not None:
        stored.update({tensor.name: (tensor, mmproj_path) for tensor in vision.tensors})
    if vision is not None and "mm.model.fc.weight" in stored:
        rows = int(stored["mm.model.fc.weight"][0].shape[-1])
        if rows != t.hidden_size:
            raise GGUFError(f"{mmproj_path}: its connector mm.model.fc.weight gives {rows} features per image token "
                            f"but the text model {text_path} has hidden size {t.hidden_size}: the files do not "
                            "belong together")

    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, QuantSpec] = {}
    kept_dense: dict[str, str] = {}
    requantised: dict[str, str] = {}
    used = {"rope_freqs.weight"}  # read by the config (llama3 rope scaling)
    for key, shape in expected.items():
        name = _gguf_name(key, text_map, vision_map)
        if name is None or name not in stored:
            where = text_path if key.startswith((_TEXT_PREFIX, HEAD + ".")) else mmproj_path
            raise GGUFError(f"{where} has no tensor {name or '?'} for {key} (shape {list(shape)})")
        tensor, path = stored[name]
        used.add(name)
        kind = tensor.tensor_type
        have = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if have != shape:
            raise GGUFError(f"{path}: tensor {name} has shape {list(have)}, the model expects {list(shape)} for {key}")
        raw = tensor.data
        heads = _heads_to_unpermute(key, config)
        if heads is not None:
            raw = gguf_tensors.unpermute_rows(raw, heads)
        module, _, leaf = key.rpartition(".")
        try:
            if leaf == "weight" and module in quantisable and kind not in gguf_tensors.DENSE:
                specs[module] = gguf_tensors.target_spec(kind)
                tensors.update({f"{module}.{k}": v for k, v in gguf_tensors.quantised(raw, kind, shape).items()})
                if kind not in gguf_tensors.SAME_BYTES:
                    requantised[key] = kind.name
            else:
                if leaf == "weight" and module in quantisable:
                    kept_dense[module] = f"stored as {kind.name} in {path.name}"
                tensors[key] = gguf_tensors.dense(raw, kind, shape)
        except NotImplementedError:
            raise GGUFError(f"{path}: tensor {name} is stored as {kind.name}, a type this library cannot read "
                            "(the gguf package has no dequantisation for it)") from None
    extra = sorted(set(stored) - used)
    if extra:
        raise GGUFError(f"{stored[extra[0]][1]} has tensors an Idefics3 model does not use: {', '.join(extra[:8])}")
    if config.tie_word_embeddings and EMBED in specs:
        specs[HEAD] = specs[EMBED]

    sources = [_summary(text_path, Counter(x.tensor_type for x in text.tensors))]
    if vision is not None:
        sources.append(_summary(mmproj_path, Counter(x.tensor_type for x in vision.tensors)))
    quantization = QuantConfig(specs, kept_dense if specs else {}, "gguf: " + " + ".join(sources))
    if requantised:
        kinds = Counter(requantised.values())
        log.info("%s: %d matrices (%s) have no equivalent in our formats: dequantised and quantised again "
                 "(at most 4.5 bits per weight -> int4, else int8, groups of 32)", " + ".join(sources),
                 len(requantised), ", ".join(f"{n} x {k}" for k, n in kinds.most_common()))
    metadata = dict(text_meta)
    if vision_meta is not None:
        metadata.update({k: v for k, v in vision_meta.items() if k.startswith("clip.")})
    return GGUFCheckpoint(config, tensors, quantization, metadata, (text_path, mmproj_path), requantised)
