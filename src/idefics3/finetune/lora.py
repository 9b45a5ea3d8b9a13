"""LoRA by composition: wrap chosen `nn.Linear` modules of a built model, save and load PEFT-format adapters,
merge.

`inject_lora(model, settings)` replaces each targeted Linear (through model/replace.py, the one way features
change a model) by a `LoRALinear` that keeps the original layer as `base_layer` and adds `lora_A` (in -> r)
and `lora_B` (r -> out); the model's code never learns about it. The layout, the initialisation (Kaiming-
uniform A, zero B, so step 0 is the base model) and the names equal PEFT's, so an adapter saved here
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`) loads
with `peft.PeftModel.from_pretrained` on transformers' model, and a PEFT adapter loads here. Target selection
follows PEFT's rules: a list of names matches a module whose name equals an entry or ends with "." + entry, a
string is a regular expression matched against the full name, and "all-linear" means every Linear but the
output head. Adapters are kept in float32 whatever the base dtype.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.replace import replace_modules
from ..quant import QuantLinear
from .parts import DEFAULT_TARGETS, PARTS

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSettings:
    """What to adapt and how: rank, alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora), dropout, and
    the target modules (a list of names or a regex string, PEFT's rules), minus modules in `exclude_parts`."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude_parts: tuple[str, ...] = ()
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.exclude_parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown model part(s) {sorted(unknown)}; choose from {sorted(PARTS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """y = base_layer(x) + scaling · B(A(dropout(x))); x [..., in] -> y [..., out]."""

    def __init__(self, base_layer: nn.Linear | QuantLinear, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer  # a frozen quantised base (QLoRA) is a QuantLinear
        device = base_layer.device if isinstance(base_layer, QuantLinear) else base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` (dtype/device probes) sees the base weight
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A in float32: [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        z = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (z * self.scaling).to(y.dtype)


# ---------------------------------------------------------------------------------------------- selection

def part_of(name: str) -> str | None:
    for part, prefixes in PARTS.items():
        if any(name == p or name.startswith(p) for p in prefixes):
            return part
    return None


def matches_peft(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry must equal it or be a '.'-suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the Linear modules `settings` adapts, in module order."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))
               and not isinstance(m, LoRALinear) and not n.endswith((".lora_A", ".lora_B"))]
    if settings.targets == "all-linear" or settings.targets == ["all-linear"]:
        chosen = [n for n in linears if n != "lm_head"]
    else:
        chosen = [n for n in linears if matches_peft(n, settings.targets)]
    chosen = [n for n in chosen if part_of(n) not in settings.exclude_parts]
    if not chosen:
        endings = sorted({n.rsplit('.', 1)[-1] for n in linears})
        raise ValueError(f"no Linear module matches the LoRA targets {settings.targets!r} outside the frozen "
                         f"parts {list(settings.exclude_parts)}; Linear names end in e.g. {endings}")
    return chosen


def inject_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Replace every targeted Linear by a LoRALinear (in place); returns the adapted module names."""
    names = select_targets(model, settings)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head" in names:
        raise ValueError("lm_head shares its weight with the input embeddings (tie_word_embeddings); "
                         "LoRA on it is not supported")
    chosen = set(names)
    replace_modules(model, lambda name, module: LoRALinear(module, settings.r, settings.scaling, settings.dropout)
                    if name in chosen else None)
    log.info("LoRA r=%d alpha=%g on %d Linear modules", settings.r, settings.alpha, len(names))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


# ---------------------------------------------------------------------------------------------- PEFT files

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under PEFT's saved key names (`base_model.model.<module>.lora_A.weight`)."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().contiguous().cpu()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().contiguous().cpu()
    return out


def _config_targets(model: nn.Module, settings: LoraSettings, names: list[str]) -> list[str] | str:
    """The short target list when PEFT's suffix rule picks exactly `names`, else the full names."""
    if isinstance(settings.targets, list) and settings.targets != ["all-linear"]:
        peft_pick = [n for n, m in model.named_modules()
                     if isinstance(m, (nn.Linear, LoRALinear)) and matches_peft(n, settings.targets)]
        if sorted(peft_pick) == sorted(names):
            return sorted(settings.targets)
    if isinstance(settings.targets, str) and settings.targets != "all-linear" and not settings.exclude_parts:
        return settings.targets
    return list(names)


def save_adapter(model: nn.Module, folder: str | Path, settings: LoraSettings,
                 base_model_name_or_path: str | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors in PEFT's format. `tensors` (the LoRA weights
    under the model's own names, e.g. gathered from shards) replaces reading them from `model`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(lora_modules(model))
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": _config_targets(model, settings, names), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": settings.use_rslora, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "exclude_modules": None, "lora_bias": False,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    state = adapter_state_dict(model) if tensors is None else {
        PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items() if ".lora_" in k}
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / ADAPTER_WEIGHTS)


def read_adapter_config(folder: str | Path) -> LoraSettings:
    """LoraSettings from a PEFT adapter_config.json; options this module cannot reproduce raise."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in the adapter folder {folder}")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: only LoRA adapters are supported, got peft_type {cfg.get('peft_type')!r}")
    unsupported = {k: cfg.get(k) for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern",
                                           "layers_to_transform", "exclude_modules", "lora_bias")
                   if cfg.get(k) not in (None, False, {}, [])}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if cfg.get("fan_in_fan_out"):
        unsupported["fan_in_fan_out"] = True
    if unsupported:
        raise ValueError(f"{path}: unsupported adapter options {unsupported}")
    targets = cfg.get("target_modules") or list(DEFAULT_TARGETS)
    return LoraSettings(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                        dropout=float(cfg.get("lora_dropout", 0.0)),
                        targets=targets if isinstance(targets, str) else list(targets),
                        use_rslora=bool(cfg.get("use_rslora", False)))


def load_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-named LoRA weights into the model's LoRALinear modules; every module must get both."""
    modules = lora_modules(model)
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in modules for ab in "AB"}
    state = {k.replace(".default.", "."): v for k, v in state.items()}  # PEFT's in-memory names also work
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter does not fit the model: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
                         f", unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    with torch.no_grad():
        for name, module in modules.items():
            for ab in "AB":
                layer = getattr(module, f"lora_{ab}")
                value = state[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"]
                if value.shape != layer.weight.shape:
                    raise ValueError(f"{name}.lora_{ab}: adapter shape {tuple(value.shape)} != "
                                     f"{tuple(layer.weight.shape)}")
                layer.weight.copy_(value)


def load_adapter(model: nn.Module, folder: str | Path) -> LoraSettings:
    """Inject LoRA as the folder's adapter_config.json says and load its weights; returns the settings."""
    settings = read_adapter_config(folder)
    inject_lora(model, settings)
    load_adapter_weights(model, load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    return settings


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling·B@A, in float32) and put the plain Linear back.
    A quantised base is dequantised first (QLoRA's merge gives full precision, never requantised)."""
    with torch.no_grad():
        for module in lora_modules(model).values():
            if isinstance(module.base_layer, QuantLinear):
                q = module.base_layer
                dense = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
                dense.weight = nn.Parameter(q.dequantized(torch.float32), requires_grad=False)
                if q.bias is not None:
                    dense.bias = nn.Parameter(q.bias.detach().float(), requires_grad=False)
                module.base_layer = dense
            base = module.base_layer
            base.weight.copy_((base.weight.float() + module.delta_weight().to(base.weight.device))
                              .to(base.weight.dtype))
    replace_modules(model, lambda name, module: module.base_layer if isinstance(module, LoRALinear) else None)
    return model
