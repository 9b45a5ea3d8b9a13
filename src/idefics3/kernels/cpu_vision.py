"""The vision encoder's CPU kernels: bias and GELU inside the matrix multiplies, and our own attention.

Where the time of a SigLIP frame goes on CPU (SmolVLM-256M, bf16, one thread, torch profiler): linear
layers 50%, flash attention 35%, GELU 6%, copies 5%. aten's `addmm` first copies the bias into the output
and then accumulates the product onto it, and the tanh-GELU is one more pass over the 3072-wide
activations. oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`) applies the bias, and the GELU, in
the epilogue of the multiply, on the model's own weight tensors.
Measured on [2, 1024, 768] activations: the MLP 10-16% faster in bf16 and ~22% in fp32, the attention
projections 4-16% (bench/speed.py reports the effect on the whole time to first token).

The attention itself (the other 35%) runs in the C++ kernel of cpu_attention.py (bf16 only), at about twice
aten's speed. And each encoder layer as a whole makes one q/k/v multiply (the three weights stacked once, a
copy of 3 D^2 per layer, rebuilt if a projection changes) whose column blocks the attention kernel reads in
place, and does both residual adds in the epilogues of out_proj and fc2: 2-8% off the encoder on top.

The backend (backend.py) replaces each vision layer, its MLP, attention and attention projections by views
(model/replace.py) of subclasses of their own classes (`VisionEncoderLayer`, `VisionMLP`, `VisionAttention`,
`nn.Linear`) whose forward takes the fused path: same parameters, names, hooks and state_dict keys, and LoRA
injection still sees `nn.Linear`s. They share one `VisionKernels` state with the backend: the stacked q/k/v
copies (owned and counted by the backend) and whether oneDNN refused to run here. The fused path runs only for
inference on a CPU tensor of the weight's dtype (bf16 or fp32) whose children are plain linears or QuantLinears
(`--include-vision`: each call dequantises their matrices to the input's dtype once, quant_prefill.dense_weight,
and multiplies as the dense layers do); with autograd recording (training), under LoRA, or anywhere else it runs
the original computation. In fp32 the results equal the plain path's to float rounding; in bf16 the GELU sees
the fp32 accumulator instead of a bf16-rounded one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..model.replace import view_as
from ..model.vision import VisionAttention, VisionEncoderLayer, VisionMLP
from ..quant.modules import QuantLinear
from .cpu_attention import vision_attention
from .derived import DerivedWeights
from .quant_prefill import FastQuantLinear, dense_weight

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16)


class VisionKernels:
    """What the fused vision modules of one backend share: its derived-weight store, whether the attention
    kernel may run, and the reason oneDNN refused to (after which every module falls back)."""

    def __init__(self, derived: DerivedWeights, attention_kernel: bool, layers: bool = True) -> None:
        self.derived = derived
        self.attention_kernel = attention_kernel
        self.layers = layers  # the fused linears; False where the plain layer measured faster
        self.broken: str | None = None

    def fusable(self, x: torch.Tensor, *weights: torch.Tensor) -> bool:
        if not self.layers or self.broken or x.device.type != "cpu" or x.dtype not in _DTYPES \
                or any(w.dtype != x.dtype for w in weights):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))

    def fallback(self, error: Exception) -> None:
        if self.broken is None:
            self.broken = str(error)
            log.warning("oneDNN fused linear unavailable here (%s); the vision encoder keeps the plain path", error)


def _dense(layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear's weight and bias as dense tensors: its own, or for a QuantLinear its matrix dequantised to
    `dtype` for this call (the prefill-side half of quantisation: the codes are read once per call and the
    multiply runs at the dense speed; nothing is kept)."""
    if isinstance(layer, QuantLinear):
        return dense_weight(layer, dtype), None if layer.bias is None else layer.bias.to(dtype)
    return layer.weight, layer.bias


def _linear(x: torch.Tensor, layer: nn.Module, activation: str = "none", algorithm: str = "") -> torch.Tensor:
    weight, bias = _dense(layer, x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], algorithm)


def _linear_add(x: torch.Tensor, layer: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """residual + layer(x), the add done in the multiply's epilogue."""
    weight, bias = _dense(layer, x.dtype)
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


def _qkv_weights(attn: VisionAttention, derived: DerivedWeights,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q_proj, k_proj and v_proj stacked into one [3D, D] weight (and [3D] bias) for a single multiply. The copy
    is kept in the backend's store and rebuilt whenever a source tensor is replaced or changed in place; for
    quantised projections it is made for the call from the dequantised matrices."""
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    if len({p.bias is None for p in parts}) > 1:
        raise RuntimeError("q, k and v projections differ in having a bias")

    def stack() -> tuple[torch.Tensor, torch.Tensor | None]:
        dense = [_dense(p, dtype) for p in parts]
        bias = torch.cat([b for _, b in dense]) if dense[0][1] is not None else None
        return torch.cat([w for w, _ in dense]), bias  # [3D, D], [3D]

    if any(isinstance(p, QuantLinear) for p in parts):
        return stack()
    tensors = [t for p in parts for t in (p.weight, p.bias) if t is not None]
    return derived.get(attn, "qkv", tensors, stack)


class FusedLinear(nn.Linear):
    """nn.Linear with the bias added in the multiply's epilogue (inference on CPU; the plain path otherwise)."""

    kernels: VisionKernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.fusable(x, self.weight):
            try:
                return _linear(x, self)
            except RuntimeError as e:
                self.kernels.fallback(e)
        return super().forward(x)


class FusedVisionMLP(VisionMLP):
    """fc2(gelu_tanh(fc1(x))) with both biases and the GELU in the multiplies' epilogues."""

    kernels: VisionKernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if all(type(m) in (nn.Linear, QuantLinear, FastQuantLinear) for m in (fc1, fc2)) and \
                self.kernels.fusable(x, *(m.weight for m in (fc1, fc2) if not isinstance(m, QuantLinear))):
            try:
                return _linear(_linear(x, fc1, "gelu", "tanh"), fc2)  # [N, S, D]
            except RuntimeError as e:
                self.kernels.fallback(e)
        return super().forward(x)


class FusedVisionAttention(VisionAttention):
    """VisionAttention whose attention itself is the C++ kernel of cpu_attention.py where it applies."""

    kernels: VisionKernels

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
        if not self.kernels.attention_kernel:
            return super().attend(q, k, v, key_mask)
        y = vision_attention(q, k, v, key_mask, self.num_heads)  # [N, S, D] or None
        return y if y is not None else super().attend(q, k, v, key_mask)


class FusedVisionEncoderLayer(VisionEncoderLayer):
    """The whole layer fused: one q/k/v multiply whose column blocks the attention reads in place, and both
    residual adds in the epilogues of out_proj and fc2 (plain linears and inference only; the layer-by-part
    path otherwise)."""

    kernels: VisionKernels

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2]
        if all(type(m) in (nn.Linear, FusedLinear, QuantLinear, FastQuantLinear) for m in linears) and \
                self.kernels.fusable(x, *(m.weight for m in linears if not isinstance(m, QuantLinear))):
            try:
                return self._fused(x, key_mask)
            except RuntimeError as e:
                self.kernels.fallback(e)
        return super().forward(x, key_mask)

    def _fused(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        weight, bias = _qkv_weights(attn, self.kernels.derived, x.dtype)
        qkv = torch.ops.mkldnn._linear_pointwise(self.layer_norm1(x), weight, bias, "none", [], "")  # [N, S, 3D]
        q, k, v = qkv.split(x.shape[-1], dim=-1)  # 3 x [N, S, D] views
        x = _linear_add(attn.attend(q, k, v, key_mask), attn.out_proj, x)  # [N, S, D]
        return _linear_add(_linear(self.layer_norm2(x), mlp.fc1, "gelu", "tanh"), mlp.fc2, x)  # [N, S, D]


_FUSED: dict[type, type] = {VisionEncoderLayer: FusedVisionEncoderLayer, VisionMLP: FusedVisionMLP,
                            VisionAttention: FusedVisionAttention}


def vision_replacement(kernels: VisionKernels) -> Callable[[str, nn.Module], nn.Module | None]:
    """The `replace_modules` choice that fuses the vision encoder: each layer, MLP and attention (exact classes)
    and the attention's four projections become fused views sharing `kernels`."""

    def choose(name: str, module: nn.Module) -> nn.Module | None:
        cls = _FUSED.get(type(module))
        if cls is None and type(module) is nn.Linear and name.rsplit(".", 2)[-2:-1] == ["self_attn"]:
            cls = FusedLinear
        if cls is None or ".vision_model." not in f".{name}":
            return None
        view = view_as(module, cls)
        view.kernels = kernels
        return view

    return choose
