"""Which modules of a model are quantised, and how: `QuantConfig` (config.json's `quantization_config`) and the
functions that put quantised modules in place of dense ones (`quantize_model`, `install_quantized`).

The policy, stated once here and recorded module by module in every quantised checkpoint:
- the text decoder's linears (q, k, v, o, gate, up, down) take the asked format (int8, or int4 in groups);
- the output head takes `head_bits` (8 by default, in groups of 32: llama.cpp's Q8_0, as its Q4 files keep
  it at 6-8 bits): it is a large share of a small model's weights and it decides every token;
- the token embeddings, a table read one row per token, take the decoder's format, as llama.cpp's Q4_0 files
  do: a row's rounding is an error in one input, not in every product. Measured on the SmolLM2-135M reference
  (bench/quant.py's corpora, fp32 compute): int4 embeddings instead of int8 raise the int4 model's mean KL
  divergence by 1.5-3.5% (0.225 -> 0.229 and 0.282 -> 0.292 nats) and bring its resident weights from 34% to
  31% of bf16's. A head tied to the embeddings shares their quantised tensors, so both take `head_bits`;
- with `include_vision`, the vision tower's linears (attention and MLP) and the connector's projection too;
- norms, biases, the patch embedding (a convolution) and the position embeddings stay dense, in the model's
  dtype: they are small and every token or patch reads them whole;
- a matrix whose input size the groups do not divide is stored padded with zero columns (format.py).
`dense` lists matrices a source chose to keep dense (a GGUF file's F16 tensors, say) with the reason.

Everything goes through `model/replace.py`, the one way features change a model; `Replacements.undo()` puts
the dense modules back (for a model quantised from dense weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.replace import Replacements, replace_modules
from .format import QuantError, QuantSpec
from .gptq import collect_hessians, gptq_quantize
from .modules import QuantEmbedding, QuantLinear

log = logging.getLogger(__name__)

METHOD = "idefics3"
FORMAT_VERSION = 1
EMBED = "model.text_model.embed_tokens"
HEAD = "lm_head"
_TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class QuantConfig:
    """What is quantised: module name -> spec, plus the dense matrices and why (see the module docstring)."""

    modules: dict[str, QuantSpec] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    source: str = "idefics3 quantize"

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "format_version": FORMAT_VERSION, "source": self.source,
                "scale_dtype": "float16",
                "modules": {name: {"bits": s.bits, "group_size": s.group_size, "asymmetric": s.asymmetric}
                            for name, s in self.modules.items()},
                "dense": dict(self.dense)}

    @classmethod
    def from_dict(cls, raw: Any) -> QuantConfig:
        """Parse config.json's `quantization_config`; QuantError names what is wrong."""
        if not isinstance(raw, dict):
            raise QuantError(f"quantization_config must be an object, got {type(raw).__name__}")
        method = raw.get("quant_method")
        if method != METHOD:
            raise QuantError(f"quantization_config.quant_method is {method!r}; this library reads {METHOD!r} "
                             "(written by `idefics3 quantize`)")
        if raw.get("format_version") != FORMAT_VERSION:
            raise QuantError(f"quantization_config.format_version {raw.get('format_version')!r} is not "
                             f"{FORMAT_VERSION}")
        modules = raw.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise QuantError("quantization_config.modules must name the quantised modules")
        specs = {}
        for name, entry in modules.items():
            if not isinstance(entry, dict):
                raise QuantError(f"quantization_config.modules[{name!r}] must be an object")
            unknown = set(entry) - {"bits", "group_size", "asymmetric"}
            if unknown:
                raise QuantError(f"quantization_config.modules[{name!r}] has unknown fields {sorted(unknown)}")
            try:
                specs[name] = QuantSpec(entry.get("bits", 4), entry.get("group_size", 32),
                                        bool(entry.get("asymmetric", False)))
            except QuantError as e:
                raise QuantError(f"quantization_config.modules[{name!r}]: {e}") from None
        return cls(specs, dict(raw.get("dense", {})), str(raw.get("source", "")))

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for spec in self.modules.values():
            counts[spec.name] = counts.get(spec.name, 0) + 1
        parts = [f"{n} x {name}" for name, n in sorted(counts.items())]
        return ", ".join(parts) + (f"; {len(self.dense)} matrices kept dense" if self.dense else "")


FORMATS_HELP = "int8, int8-channel, int8-g64, int4, int4-g64, int4-g128, int4-asym (with per-group minimums)"


def parse_quantize(value: str | QuantConfig | None) -> QuantSpec | QuantConfig | None:
    """A `quantize=` argument: None, a QuantConfig, or a format name ("int8", "int4", "int4-g64",
    "int8-channel", "int4-asym", "int4-asym-g128") -> the QuantSpec of the decoder's linears."""
    if value is None or isinstance(value, QuantConfig):
        return value
    parts = str(value).strip().lower().split("-")
    bits, group, asymmetric = {"int8": 8, "int4": 4}.get(parts[0]), 32, False
    rest = parts[1:]
    if rest[:1] == ["asym"]:
        asymmetric, rest = True, rest[1:]
    if rest == ["channel"]:
        group, rest = 0, []
    elif len(rest) == 1 and rest[0].startswith("g") and rest[0][1:].isdigit():
        group, rest = int(rest[0][1:]), []
    if bits is None or rest:
        raise QuantError(f"unknown quantisation {value!r} (use {FORMATS_HELP})")
    try:
        return QuantSpec(bits, group, asymmetric)
    except QuantError as e:
        raise QuantError(f"quantisation {value!r}: {e}") from None


def plan(model: nn.Module, bits: int = 4, group_size: int = 32, include_vision: bool = False,
         head_bits: int = 8, asymmetric: bool = False) -> QuantConfig:
    """The QuantConfig of the policy above for this model (asymmetric: int4 with per-group minimums)."""
    spec = QuantSpec(bits, group_size, asymmetric)
    head = QuantSpec(head_bits, 32)
    config = QuantConfig()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if name == HEAD or (name == EMBED and _tied(model)):
            chosen = head
        elif name == EMBED:
            chosen = spec
        elif name.startswith("model.text_model.layers.") and leaf in _TEXT_LINEARS:
            chosen = spec
        elif include_vision and (name.startswith("model.vision_model.encoder.")
                                 or name.startswith("model.connector.")) and isinstance(module, nn.Linear):
            chosen = spec
        else:
            continue
        config.modules[name] = chosen
    config.source = f"idefics3 quantize ({spec.name}, head int{head_bits}" + \
        (", vision included)" if include_vision else ")")
    return config


def _tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def _swap(model: nn.Module, config: QuantConfig, make) -> Replacements:
    """Replace every module named in the config by make(name, module, spec); a tied head follows its embedding."""
    tied = _tied(model) and HEAD in config.modules
    if tied and config.modules.get(EMBED) != config.modules[HEAD]:
        raise QuantError("the output head is tied to the embeddings, so both need the same format")
    made: dict[str, nn.Module] = {}
    names = set(config.modules)
    found = {name for name, _ in model.named_modules()}
    missing = sorted(names - found)
    if missing:
        raise QuantError(f"quantization_config names modules the model does not have: {', '.join(missing[:5])}")

    def choose(name: str, module: nn.Module) -> nn.Module | None:
        if name not in names:
            return None
        if tied and name == HEAD:
            return QuantLinear.tied_to(made[EMBED])
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise QuantError(f"{name} is a {type(module).__name__}; only Linear and Embedding modules are quantised")
        made[name] = make(name, module, config.modules[name])
        return made[name]

    record = replace_modules(model, choose)
    model.quantization = config  # type: ignore[assignment]
    if hasattr(model, "config"):
        model.config.extra["quantization_config"] = config.to_dict()
    return record


def quantize_model(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None) -> Replacements:
    """Quantise a dense model in place (module by module, so the peak is one dense matrix more than the
    result); returns the record that puts the dense modules back.

    calibration: token windows [W, T]: the text decoder's linears (and an untied head) are then quantised by
    GPTQ (gptq.py) on the inputs the model gives them over this text; the embeddings, a tied head and the vision
    tower (which text does not reach) are rounded to nearest as without it."""
    hessians: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    if calibration is not None:
        shared = _gptq_inputs(model, config)
        hessians = collect_hessians(model, sorted(set(shared.values())), calibration)
        config.source += f", GPTQ on {calibration.numel()} calibration tokens"

    def make(name: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        if isinstance(module, nn.Embedding):
            return QuantEmbedding.from_embedding(module, spec)
        if name not in shared:
            return QuantLinear.from_linear(module, spec)
        w = module.weight
        q = QuantLinear(module.in_features, module.out_features, spec, module.bias is not None, w.device, w.dtype)
        q.set_quantised({k: t.to(w.device) for k, t in gptq_quantize(w, hessians[shared[name]], spec).items()})
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        return q

    record = _swap(model, config, make)
    log.info("quantised %s", config.summary())
    return record


def _gptq_inputs(model: nn.Module, config: QuantConfig) -> dict[str, str]:
    """The modules GPTQ quantises -> the module whose input is theirs (q, k and v read one input, gate and up
    another: one Hessian each)."""
    out = {}
    for name in config.modules:
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("model.text_model.layers.") and leaf in _TEXT_LINEARS:
            parent = name.rsplit(".", 1)[0]
            out[name] = f"{parent}.q_proj" if leaf in ("k_proj", "v_proj") else \
                f"{parent}.gate_proj" if leaf == "up_proj" else name
        elif name == HEAD and not _tied(model):
            out[name] = name
    return out


def install_quantized(model: nn.Module, config: QuantConfig) -> Replacements:
    """Put empty quantised modules (on the modules' device, typically meta) where the config says, ready for a
    quantised checkpoint's tensors."""
    def make(name: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        if isinstance(module, nn.Embedding):
            w = module.weight
            return QuantEmbedding(module.num_embeddings, module.embedding_dim, spec, w.dtype, w.device)
        w = module.weight
        return QuantLinear(module.in_features, module.out_features, spec, module.bias is not None, w.device, w.dtype)

    return _swap(model, config, make)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Put dense modules (in `dtype`, default the model's compute dtype) back in place of every quantised one,
    a tied head tied again, and drop the quantization_config: a full-precision model (for `merge`)."""
    embed: nn.Embedding | None = None

    def choose(name: str, module: nn.Module) -> nn.Module | None:
        nonlocal embed
        if isinstance(module, QuantEmbedding):
            target = dtype or module.dtype
            embed = nn.Embedding(module.num_embeddings, module.embedding_dim, device=module.device, dtype=target)
            embed.weight = nn.Parameter(module.dequantized(target), requires_grad=False)
            return embed
        if isinstance(module, QuantLinear):
            target = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device="meta", dtype=target)
            dense.weight = nn.Parameter(module.dequantized(target), requires_grad=False)
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.detach().to(target), requires_grad=False)
            return dense
        return None

    replace_modules(model, choose)
    if _tied(model) and embed is not None:
        model.lm_head.weight = embed.weight  # type: ignore[union-attr]
    if hasattr(model, "quantization"):
        del model.quantization
    if hasattr(model, "config"):
        model.config.extra.pop("quantization_config", None)


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, a tied head's shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
