"""Loading with quantisation: the `LoadHooks` (weights.py) that fill a quantised checkpoint, or quantise a
dense one tensor by tensor as it is read, so the dense model never exists in memory at once.

A quantised folder is recognised by `quantization_config` in its config.json (written by `idefics3 quantize`);
its tensors load as they are stored (int8/uint8 codes, fp16 scales), nothing is unpickled, and a missing or
misshapen scale is an error naming the file's tensor. `quantize=` on a dense checkpoint plans the policy of
quant/apply.py on the model built on the meta device and quantises each matrix when its tensor is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Idefics3Config
from ..weights import LoadHooks
from .apply import QuantConfig, install_quantized, parse_quantize, plan
from .format import QuantError, quantize
from .modules import QuantEmbedding

_STORED = ("qweight", "scales", "mins")


def _set_embedding_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        if isinstance(module, QuantEmbedding):
            module.dtype = dtype


def _module_key(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def quantized_folder_hooks(config: Idefics3Config) -> LoadHooks | None:
    """Hooks for a folder whose config.json has a quantization_config (None for a dense one)."""
    raw = config.extra.get("quantization_config")
    if raw is None:
        return None
    qconfig = QuantConfig.from_dict(raw)

    def convert(key: str, tensor: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor] | None:
        module, leaf = _module_key(key)
        if leaf not in _STORED or module not in qconfig.modules:
            return None
        want = qconfig.modules[module].dtypes().get(leaf)
        if tensor.dtype != want:
            raise QuantError(f"{key} is stored as {tensor.dtype}; {qconfig.modules[module].name} needs {want}")
        return {key: tensor.to(device)}

    return LoadHooks(prepare=lambda model: install_quantized(model, qconfig), convert=convert,
                     finish=_set_embedding_dtype)


def quantize_on_load_hooks(quantize_arg: str | QuantConfig, include_vision: bool = False,
                           head_bits: int = 8) -> LoadHooks:
    """Hooks that quantise a dense checkpoint while reading it (`from_pretrained(quantize="int4")`)."""
    parsed = parse_quantize(quantize_arg)
    chosen: dict[str, QuantConfig] = {}

    def prepare(model: nn.Module) -> None:
        if isinstance(parsed, QuantConfig):
            qconfig = parsed
        else:
            qconfig = plan(model, parsed.bits, parsed.group_size, include_vision, head_bits, parsed.asymmetric)
        install_quantized(model, qconfig)
        chosen["config"] = qconfig

    def found(keys: dict[str, tuple[list[int], Path]]) -> dict[str, tuple[list[int], Path]]:
        qconfig, out = chosen["config"], {}
        for key, (shape, path) in keys.items():
            module, leaf = _module_key(key)
            if leaf == "weight" and module in qconfig.modules:
                for name, stored in qconfig.modules[module].shapes(*shape).items():
                    out[f"{module}.{name}"] = (list(stored), path)
            else:
                out[key] = (shape, path)
        return out

    def convert(key: str, tensor: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor] | None:
        module, leaf = _module_key(key)
        spec = chosen["config"].modules.get(module)
        if leaf != "weight" or spec is None:
            return None
        return {f"{module}.{k}": v.to(device) for k, v in quantize(tensor.to(device), spec).items()}

    return LoadHooks(prepare=prepare, found=found, convert=convert, finish=_set_embedding_dtype)
