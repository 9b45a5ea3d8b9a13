"""The kernel backend: which implementation runs each hot op of one model, why, and what memory it owns.

    backend = install_backend(model, "auto")   # or "torch": the plain PyTorch path everywhere
    print("\\n".join(backend.describe()))       # one line per op: implementation and reason
    engine = Engine(model, backend=backend)    # the engine asks it for a fused decoder
    backend.remove()                           # the model as it was

Installing is the one explicit step that changes a model for speed, and it happens once, at load
(`idefics3.load_model` / `AutoModelForVision2Seq.from_pretrained(..., backend="auto")`) or where the caller
calls it. On CPU it replaces the vision encoder's layers and the decoder's attention modules by fused views
(model/replace.py: same parameters and names, forward through oneDNN epilogues and our C++ attention), and it
hands the engine a fused decode step (cpu_decode.py) per KV cache. Everything derived from the weights
(stacked q/k/v, packed decode matrices) lives in the backend's `DerivedWeights`, so `nbytes()` reports it.
Each op's choice is made here by capability (device, dtype, CPU features, a successful build) and, for the
two attention ops, by timing our kernel against SDPA on the model's shapes (calibrate.py), and recorded with
its reason; `idefics3 info` prints them. Nothing else in the package changes a model behind its back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.kv_cache import KVCache
from ..model.replace import Replacements, replace_modules, view_as
from ..quant.modules import QuantLinear
from . import calibrate, cpu_attention, cpu_decode, quant_prefill
from .build import ENV_SWITCH, kernels_enabled
from .cpu_text import MIN_QUERIES, text_replacement
from .cpu_vision import FusedVisionEncoderLayer, VisionKernels, vision_replacement
from .derived import DerivedWeights

log = logging.getLogger(__name__)

CHOICES = ("auto", "torch")
TORCH = "torch"


@dataclass
class OpChoice:
    op: str      # "vision layers", "vision attention", "prefill attention", "decode"
    impl: str    # what runs it ("torch" for the plain path)
    reason: str  # why


@dataclass
class Backend:
    """What `install_backend` chose for one model (see the module docstring)."""

    requested: str
    choices: dict[str, OpChoice] = field(default_factory=dict)
    derived: DerivedWeights = field(default_factory=DerivedWeights)
    replacements: Replacements = field(default_factory=Replacements)
    decode_amx_rows: int = 0  # decode steps of at least this many rows run on AMX tiles (0: never)

    def choose(self, op: str, impl: str, reason: str) -> None:
        self.choices[op] = OpChoice(op, impl, reason)
        log.debug("%s: %s (%s)", op, impl, reason)

    def impl(self, op: str) -> str:
        choice = self.choices.get(op)
        return choice.impl if choice is not None else TORCH

    def decoder_for(self, model: nn.Module, cache: KVCache) -> cpu_decode.CpuDecoder | None:
        """A fused decode step over the model's decoder and `cache`, or None (plain path) where the decode op
        is not on the kernel or this model/cache no longer fits it (LoRA injected since, another cache dtype)."""
        if self.impl("decode") == TORCH:
            return None
        parts = cpu_decode.DecoderParts.of(model)
        reason = cpu_decode.unsupported_reason(parts, cache)
        if reason is not None:
            log.info("fused CPU decode off for this engine: %s", reason)
            return None
        variant = cpu_decode.variant_for(parts.dtype)
        decoder = cpu_decode.CpuDecoder(parts, cache, cpu_decode.load_library(variant), self.derived, variant)
        if self.decode_amx_rows and not decoder.quantised:  # AMX was chosen for dense weights quantised since
            decoder.use_amx(self.decode_amx_rows)
        return decoder

    def nbytes(self) -> int:
        """Memory of the weights derived for the kernels (packed and stacked copies)."""
        return self.derived.nbytes()

    def describe(self) -> list[str]:
        """One line per op: its implementation and why."""
        lines = [f"{c.op + ':':<19} {c.impl} ({c.reason})" for c in self.choices.values()]
        return lines + [f"{'derived weights:':<19} {self.nbytes() / 2**20:.1f} MiB"]

    def remove(self) -> None:
        """Put the model's own modules back and free the derived weights."""
        self.replacements.undo()
        self.derived.clear()
        for op in list(self.choices):
            self.choose(op, TORCH, "backend removed")


def install_backend(model: nn.Module, backend: str = "auto") -> Backend:
    """Choose and install the implementation of each hot op for `model` as it is now (device, dtype).

    backend "torch" changes nothing (every op on the plain path); "auto" takes our kernels wherever this machine
    and model can run them. Call it once the weights are final (after `.to(...)`; LoRA injected later simply
    turns the affected kernels off again)."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    result = Backend(backend)
    ops = ("vision layers", "vision attention", "prefill attention", "quantised prefill", "decode")
    device, dtype = model.model.text_model.norm.weight.device, model.model.text_model.norm.weight.dtype
    why_not = _machine_reason(backend, device)
    if why_not is not None:
        for op in ops:
            result.choose(op, TORCH, why_not)
        return result
    v, t = model.config.vision_config, model.config.text_config
    attention_reason = cpu_attention.unsupported_reason(dtype, device, v.hidden_size // v.num_attention_heads)
    vision_dtype = model.model.vision_model.post_layernorm.weight.dtype
    if model.model.vision_model.post_layernorm.weight.is_meta:  # a text-only model (model/idefics3.py)
        result.choose("vision layers", TORCH, "no vision tower (text only)")
        result.choose("vision attention", TORCH, "no vision tower (text only)")
    elif vision_dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        result.choose("vision layers", TORCH, f"oneDNN fused linears need fp32 or bf16 with oneDNN ({vision_dtype})")
        result.choose("vision attention", TORCH, "the vision layers are not fused")
    else:
        use_kernel = attention_reason is None
        if use_kernel:
            heads = v.num_attention_heads
            verdict = calibrate.vision_attention(heads, (v.image_size // v.patch_size) ** 2, v.hidden_size // heads,
                                                 vision_dtype)
            use_kernel, attention_reason = verdict.ours, verdict.reason
        kernels = VisionKernels(result.derived, attention_kernel=use_kernel)
        layer = model.model.vision_model.encoder.layers[0]
        fused_layer = view_as(layer, FusedVisionEncoderLayer)
        fused_layer.kernels = kernels
        layer_verdict = calibrate.vision_layer(layer, fused_layer, (v.image_size // v.patch_size) ** 2,
                                               v.hidden_size, vision_dtype)
        kernels.layers = layer_verdict.ours
        result.replacements.changed += replace_modules(model, vision_replacement(kernels)).changed
        result.choose("vision layers", "oneDNN linears with bias, GELU and residual in the epilogues"
                      if kernels.layers else TORCH, ("inference on CPU; training and LoRA layers take the plain "
                                                     f"path; {layer_verdict.reason}") if kernels.layers
                      else layer_verdict.reason)
        result.choose("vision attention", "C++ flash attention (AVX512-BF16)" if use_kernel else TORCH,
                      f"bf16 on a CPU with AVX512-BF16; {attention_reason}" if use_kernel else attention_reason)
    text_reason = cpu_attention.unsupported_reason(dtype, device, t.head_dim)
    if text_reason is None:
        verdict = calibrate.prefill_attention(t.num_attention_heads, t.num_key_value_heads, t.head_dim, dtype)
        text_reason = None if verdict.ours else verdict.reason
    if text_reason is None:
        memo = cpu_attention.LimitsMemo()
        result.replacements.changed += replace_modules(model, text_replacement(memo)).changed
        result.choose("prefill attention", "C++ flash attention (AVX512-BF16)",
                      f"prompts of {MIN_QUERIES}+ tokens, bf16 on a CPU with AVX512-BF16; {verdict.reason}")
    else:
        result.choose("prefill attention", TORCH, text_reason)
    _choose_quantised_prefill(result, model, dtype)
    _choose_decode(result, model, dtype)
    return result


def _choose_quantised_prefill(result: Backend, model: nn.Module, dtype: torch.dtype) -> None:
    """QuantLinears run each call by the method measured fastest for its format, shape and row count
    (quant_prefill.py) where this machine has the decode library."""
    if not any(type(m) is QuantLinear for m in model.modules()):
        result.choose("quantised prefill", TORCH, "no quantised linears")
        return
    if quant_prefill.library() is None:
        result.choose("quantised prefill", TORCH, "no decode library on this machine (AVX2 at least)")
        return
    changed = replace_modules(model, quant_prefill.quant_replacement(dtype)).changed
    result.replacements.changed += changed
    views = [parent._modules[child] for parent, child, _ in changed]
    plans = {id(view.plan): view.plan for view in views if isinstance(view, quant_prefill.FastQuantLinear)}
    per_rows = ", ".join(f"{rows}: {'/'.join(sorted({p.methods[i] for p in plans.values()}))}"
                         for i, rows in enumerate(quant_prefill.ROW_BUCKETS))
    for plan in plans.values():
        log.info("quantised prefill: %s", plan.reason)
    how = "measured per format and shape" if calibrate.calibrating() else f"{calibrate.ENV_CALIBRATE}=0, not measured"
    used = {m for p in plans.values() for m in p.methods}
    result.choose("quantised prefill", f"by rows per call ({per_rows}): " + "; ".join(
                  f"{m}: {note}" for m, note in quant_prefill.METHOD_NOTES.items() if m in used),
                  f"inference on CPU; training takes the plain path; {how} ({len(plans)} shapes, timings in the log)")


def _choose_decode(result: Backend, model: nn.Module, dtype: torch.dtype) -> None:
    """The decode op: the fused kernel of this ISA level (and from how many rows on AMX tiles), or the plain
    forward, each by measurement (calibrate.decode)."""
    reason = cpu_decode.unsupported_reason(cpu_decode.DecoderParts.of(model))
    if reason is not None:
        result.choose("decode", TORCH, reason)
        return
    variant = cpu_decode.variant_for(dtype)
    parts = cpu_decode.DecoderParts.of(model)
    no_amx = "fp32 weights" if dtype != torch.bfloat16 else \
        cpu_decode.amx_reason(cpu_decode.load_library(variant), variant, quantised=parts.quantised)
    plan = calibrate.decode(model, result.derived, variant, amx=no_amx is None)
    if not plan.kernel:
        result.choose("decode", TORCH, plan.reason)
        return
    result.decode_amx_rows = plan.amx_rows
    isa = {("avx512", True): "AVX512-BF16", ("avx512", False): "AVX-512 FMA"}.get(
        (variant, dtype == torch.bfloat16), "AVX2 + FMA, bf16 widened" if dtype == torch.bfloat16 else "AVX2 + FMA")
    amx = {0: "", 1: "; every step on AMX tiles", 2: "; batches on AMX tiles"}[plan.amx_rows]
    how = ("int8 inputs times the codes in integers (AVX512-VNNI)" if cpu_decode.quant_inputs(variant) == "int8"
           else "dequantised in registers")
    weights = "" if not parts.quantised else f"; weights {parts.formats()}, {how}"
    result.choose("decode", f"fused C++ decode step ({isa}{amx}{weights})",
                  f"{plan.reason}" + (f"; no AMX: {no_amx}" if no_amx and dtype == torch.bfloat16 else ""))


def _machine_reason(backend: str, device: torch.device) -> str | None:
    if backend == TORCH:
        return "backend 'torch' asked for"
    if not kernels_enabled():
        return f"{ENV_SWITCH}=0"
    if device.type != "cpu":
        return f"the model is on {device.type}; the kernels are for CPUs"
    return None
