"""One way in: name a model, load it and its processor, ask it something.

    model = load_model("HuggingFaceTB/SmolVLM-256M-Instruct", dtype="bf16")   # kernels installed: backend="auto"
    processor = load_processor(model.checkpoint_dir, longest_edge=1024)
    text = ask(model, processor, "What is in this image?", images=[image])

A model reference may also be llama.cpp's GGUF text model (a path ending in .gguf) with `mmproj=` its vision
projector file (None: text only), read by quant/gguf.py into our quantised formats, with the processor from the
files' metadata (processing/gguf.py); `save_pretrained` of such a model writes a normal quantised folder.

Everything above this module (the CLI, the demo, fine-tuning, the benches and tests) loads and asks through
it, so a model reference, a dtype name and a device mean the same everywhere. It also defines what users load,
`Idefics3ForConditionalGeneration`: the network of model/idefics3.py plus the model card's conveniences
(`from_pretrained` that installs the kernel backend, `generate`, an image-feature cache), exported as
`idefics3.Idefics3ForConditionalGeneration` and `AutoModelForVision2Seq`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import DEMO_MODEL
from .compat import ANY, take_neutral
from .config import Idefics3Config
from .device import default_dtype, runnable_dtype
from .dtypes import DEVICES, to_torch_dtype
from .generation.encoder_cache import EncoderCache
from .generation.generate import generate
from .generation.streamer import IncrementalDecoder
from .hub import resolve_model_path
from .kernels.backend import Backend, install_backend
from .model.idefics3 import Idefics3
from .processing.gguf import processor_from_gguf
from .processing.processor import Idefics3Processor
from .quant import (
    QuantConfig,
    QuantEmbedding,
    QuantError,
    install_quantized,
    parse_quantize,
    quantize_on_load_hooks,
    quantized_folder_hooks,
)
from .quant.apply import EMBED, HEAD
from .quant.gguf import read_gguf
from .weights import LoadHooks, no_init, parse_dtype

MODEL_ENV = "IDEFICS3_MODEL"

# transformers' from_pretrained arguments that change nothing here (compat.py)
_NEUTRAL_LOAD = {"trust_remote_code": ANY, "low_cpu_mem_usage": ANY, "use_safetensors": True,
                 "attn_implementation": ANY, "_attn_implementation": ANY, "local_files_only": ANY}


class Idefics3ForConditionalGeneration(Idefics3):
    """The Idefics3 network with the model card's conveniences (see the module docstring).

    backend: the kernel backend installed at load (kernels/backend.py), or None for the plain path.
    encoder_cache: image features of recent images, so `generate` skips the encoder for a repeated image.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.backend: Backend | None = None
        self.encoder_cache: EncoderCache | None = EncoderCache()
        self.gguf_files: tuple[Path, Path | None] | None = None  # (text model, mmproj) when loaded from GGUF

    @classmethod
    def from_pretrained(cls, ref: str | Path, dtype: torch.dtype | str | None = None,  # type: ignore[override]
                        device: torch.device | str | None = None, revision: str | None = None, *,
                        torch_dtype: torch.dtype | str | None = None, backend: str = "auto",
                        device_map: str | None = None, quantize: str | QuantConfig | None = None,
                        include_vision: bool = False, mmproj: str | Path | None = None, **transformers_args: Any
                        ) -> Idefics3ForConditionalGeneration:
        """Load a checkpoint folder or Hub id and install the kernel backend ("auto": our CPU kernels where
        they run, "torch": the plain path). dtype (alias torch_dtype): a torch dtype, a name, or "auto" (the
        checkpoint's; fp32 on CPUs without bf16). device (or a device_map naming one device) defaults to the CPU.
        quantize: "int8" / "int4" (groups of 32; "int4-g64", "int4-g128", "int8-channel") quantises a dense
        checkpoint while loading it (include_vision: the vision tower too); a quantised folder (`idefics3
        quantize`) loads as it is. transformers' neutral arguments are accepted; any other keyword raises."""
        take_neutral("from_pretrained", transformers_args, _NEUTRAL_LOAD)
        if device_map is not None:
            if device is not None or not isinstance(device_map, str) or device_map == "auto":
                raise ValueError(f"device_map={device_map!r}: give one device (device='cuda' or device_map='cuda')")
            device = device_map
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one")
        dtype = dtype if dtype is not None else torch_dtype
        if is_gguf(ref):
            if quantize is not None or include_vision:
                raise QuantError(f"{ref} is a GGUF file, quantised as llama.cpp stored it: load it without quantize=")
            if revision is not None:
                raise ValueError(f"revision={revision!r} is for Hub repositories; {ref} is a local GGUF file")
            model = load_gguf(cls, ref, mmproj, dtype, device)
        else:
            if mmproj is not None:
                raise ValueError(f"mmproj= goes with a GGUF text model (a .gguf file), not {str(ref)!r}")
            hooks = _quantization_hooks(quantize, include_vision)
            model = super().from_pretrained(ref, dtype, device, revision, hooks)
        model.backend = install_backend(model, backend)
        return model

    def save_pretrained(self, folder: str | Path, max_shard_size: int | str | None = None) -> None:
        """Write the checkpoint folder; a model loaded from GGUF also gets the processor files of its GGUF
        metadata and a generation_config.json, so the folder loads like any quantised checkpoint."""
        super().save_pretrained(folder, max_shard_size)
        if self.gguf_files is not None:
            processor_from_gguf(*self.gguf_files).save_pretrained(folder)
            t = self.config.text_config
            generation = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                          "pad_token_id": t.pad_token_id}
            Path(folder, "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                                              encoding="utf-8")

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """Prompt + new token ids, like transformers' generate; see `idefics3.generation.generate`."""
        return generate(self, **kwargs)


AutoModelForVision2Seq = Idefics3ForConditionalGeneration


def _quantization_hooks(quantize: str | QuantConfig | None, include_vision: bool
                        ) -> Callable[[Idefics3Config], LoadHooks | None]:
    """What loading does about quantisation, once the checkpoint's config is read."""
    if quantize is None and include_vision:
        raise ValueError("include_vision=True needs quantize= (it says whether the vision tower is quantised)")
    parse_quantize(quantize)  # a bad name fails before anything is read

    def hooks(config: Idefics3Config) -> LoadHooks | None:
        stored = quantized_folder_hooks(config)
        if stored is not None and quantize is not None:
            summary = QuantConfig.from_dict(config.extra["quantization_config"]).summary()
            raise QuantError(f"this checkpoint is already quantised ({summary}); load it without quantize=")
        return stored if quantize is None else quantize_on_load_hooks(quantize, include_vision)

    return hooks


def load_gguf(cls: type, text: str | Path, mmproj: str | Path | None = None,
              dtype: torch.dtype | str | None = None, device: torch.device | str | None = None):
    """Build `cls` from llama.cpp's GGUF text model and, optionally, its mmproj vision projector (read_gguf):
    quantised modules installed on the meta device and filled with the files' blocks as they are, dense tensors
    converted to `dtype` ("auto"/None: the file's, bf16 for quantised files, fp32 where bf16 does not run), the
    head tied to the embeddings when the file has no output tensor. Without mmproj the model is text only."""
    checkpoint = read_gguf(text, mmproj)
    config = checkpoint.config
    target = parse_dtype(dtype, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None or dtype == "auto":
        target = runnable_dtype(target, device)
    with no_init():
        model = cls(config)
    quantised = checkpoint.quantization
    stored: set[str] = set()
    if quantised.modules:
        install_quantized(model, quantised)
        stored = {f"{name}.{leaf}" for name, spec in quantised.modules.items() for leaf in spec.dtypes()}
    state = {key: tensor.to(device) if key in stored else tensor.to(device=device, dtype=target)
             for key, tensor in checkpoint.tensors.items()}
    tied = config.tie_word_embeddings
    if tied:
        state.update({HEAD + key[len(EMBED):]: v for key, v in list(state.items()) if key.startswith(EMBED + ".")})
    model.load_state_dict(state, strict=True, assign=True)
    if tied and isinstance(getattr(model.lm_head, "weight", None), torch.nn.Parameter):
        model.lm_head.weight = model.model.text_model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, QuantEmbedding):
            module.dtype = target
    model.config.torch_dtype = str(target).removeprefix("torch.")
    model.checkpoint_dir = None
    model.name_or_path = str(text)
    model.gguf_files = checkpoint.files
    return model.eval()


# ---- naming and loading ---------------------------------------------------------------------------------
def is_gguf(ref: str | os.PathLike | None) -> bool:
    """Whether a model reference names a GGUF file (llama.cpp's format) rather than a checkpoint folder."""
    return ref is not None and str(ref).lower().endswith(".gguf")


def resolve_model(ref: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder of `ref` (or the file, for a .gguf path), else of $IDEFICS3_MODEL, else the
    built-in demo model (Hub ids are fetched through huggingface_hub's cache). Raises FileNotFoundError naming
    what is missing."""
    ref = ref or os.environ.get(MODEL_ENV) or (str(DEMO_MODEL) if DEMO_MODEL.is_dir() else None)
    if not ref:
        raise FileNotFoundError(f"no model given: pass a checkpoint folder or Hub id (or set {MODEL_ENV})")
    if is_gguf(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
        return path
    folder = resolve_model_path(ref)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not an Idefics3 checkpoint: it has no config.json")
    return folder


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, checked to exist here; by default CUDA when available, else the CPU."""
    name = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"unknown device {name!r} (use one of: {', '.join(DEVICES)})")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but CUDA is not available")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps was asked for, but MPS is not available")
    return torch.device(name)


def load_model(ref: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, backend: str = "auto",
               mmproj: str | os.PathLike | None = None, quantize: str | None = None
               ) -> Idefics3ForConditionalGeneration:
    """Load for inference: dtype a torch dtype or name ("bf16", "fp16", "fp32"; default: bf16 on CUDA and on
    CPUs with bf16 instructions, else fp32; "auto": the checkpoint's), device as `pick_device`, and the kernel
    backend ("auto" or "torch"). For a GGUF text model (ref ending in .gguf), mmproj is its vision projector
    file (None: text only). quantize: "int8" / "int4" / ... quantises a dense checkpoint while loading."""
    folder = resolve_model(ref)
    target = pick_device(device)
    if dtype is None:
        dtype = default_dtype(target)
    elif dtype != "auto":
        dtype = to_torch_dtype(dtype)
    return Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=target,
                                                            backend=backend, mmproj=mmproj,
                                                            quantize=quantize).eval()


def load_processor(ref: str | os.PathLike | None = None, longest_edge: int | None = None,
                   split: bool = True, mmproj: str | os.PathLike | None = None,
                   tokenizer: str | os.PathLike | None = None) -> Idefics3Processor:
    """The checkpoint's processor; longest_edge (pixels) and split=False lower the image tokens. For a GGUF
    text model: the tokenizer and chat template of its metadata (or of the folder `tokenizer`, holding
    tokenizer.json), the image settings of the mmproj file's (processing/gguf.py)."""
    overrides: dict[str, Any] = {}
    if longest_edge is not None:
        if longest_edge <= 0:
            raise ValueError(f"longest_edge must be a positive number of pixels, got {longest_edge}")
        overrides["size"] = {"longest_edge": longest_edge}
    if not split:
        overrides["do_image_splitting"] = False
    path = resolve_model(ref)
    if is_gguf(path):
        return processor_from_gguf(path, mmproj, tokenizer, **overrides)
    if mmproj is not None or tokenizer is not None:
        raise ValueError(f"mmproj= and tokenizer= go with a GGUF text model (a .gguf file), not {str(path)!r}")
    return Idefics3Processor.from_pretrained(path, **overrides)


# ---- asking -----------------------------------------------------------------------------------------------
def user_turn(prompt: str, n_images: int) -> dict[str, Any]:
    """One user message: the images first, unless the prompt places `<image>` itself (once per image)."""
    if "<image>" not in prompt:
        return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}
    pieces = prompt.split("<image>")
    if len(pieces) - 1 != n_images:
        raise ValueError(f"the prompt places {len(pieces) - 1} <image> but {n_images} images were given")
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return {"role": "user", "content": parts}


def ask(model: Idefics3, processor: Idefics3Processor, prompt: str | list[dict[str, Any]],
        images: list[Any] | None = None, on_text: Callable[[str], None] | None = None,
        **settings: Any) -> str:
    """The model's answer (special tokens skipped, leading space trimmed) to a question or a conversation.

    prompt: a question (the images go before it, or where it places `<image>`) or a list of chat messages.
    on_text: called with each new piece of the answer as it is generated (streaming).
    settings: generate's (max_new_tokens, do_sample, temperature, top_p, seed, ...); greedy by default."""
    images = list(images or [])
    messages = [user_turn(prompt, len(images))] if isinstance(prompt, str) else prompt
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    decoder = IncrementalDecoder(processor.tokenizer, skip_special_tokens=True)
    pieces: list[str] = []

    def emit(piece: str) -> None:
        if not pieces:
            piece = piece.lstrip()  # the answer follows "Assistant:" with a space
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    settings.setdefault("do_sample", False)
    with torch.inference_mode():
        generate(model, **inputs, callback=lambda row, token: emit(decoder.push(token)), **settings)
    emit(decoder.flush())
    return "".join(pieces).rstrip()
