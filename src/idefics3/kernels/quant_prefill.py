"""Prefill on quantised weights: each QuantLinear call dequantises its matrix once, in C, and multiplies densely.

A prompt of T tokens multiplies every matrix by T rows, so unlike decode it is bound by arithmetic, not by the
bytes of the weights: the fastest way to run a quantised layer over a long prompt is to make the dense matrix
once for the call and hand it to the same oneDNN / AMX multiply a bf16 model uses. `QuantLinear.forward` does
that in torch (unpack, convert, subtract, multiply, cast: five passes over a matrix and four temporaries), which
on SmolVLM-256M's int4 prompt-with-image took 0.5 s of a 3.7 s time to first token. The decode library's
`idefics3_dequantize` (cpu_decode_model.h) makes the same values in one pass per row on all threads.

The backend (backend.py) puts `FastQuantLinear` views (model/replace.py) in place of the model's QuantLinears:
same buffers, names and state_dict keys, a forward that takes this path for inference on CPU tensors of fp32 or
bf16 and the plain one otherwise (autograd recording, other devices, or no library here). Nothing is kept
between calls: the memory a quantised model saves stays saved; a call holds one dense matrix at a time. The
vision encoder's fused layers (cpu_vision.py) dequantise their QuantLinears through `dense_weight` too.

Measured: see bench/quant.py (time to first token of each format against bf16, same run).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..device import ENV_ISA
from ..model.replace import view_as
from ..quant.modules import QuantLinear
from . import cpu_decode

_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def library():
    """The decode library of this machine's build (either exports idefics3_dequantize), or None."""
    return _library_at(os.environ.get(ENV_ISA, ""))


@functools.cache
def _library_at(forced_isa: str):
    """_library for one IDEFICS3_CPU_ISA setting: the CPU is probed once, not at every call."""
    variant = cpu_decode.variant_for(torch.bfloat16)
    if variant is None:
        return None
    lib = cpu_decode.load_library(variant)
    return None if isinstance(lib, str) else lib


def dense_weight(module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The module's matrix [out, in] in `dtype`, equal to `module.dequantized(dtype)`: made by the C library
    where this machine has one and the codes are contiguous CPU tensors, else by torch."""
    lib = library() if dtype in _OUT_DTYPES else None
    tensors = module.quant_tensors().values()
    if lib is None or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return module.dequantized(dtype)
    fields, _ = cpu_decode.weight_fields(module)  # addresses in the module's own buffers
    table = torch.tensor(fields, dtype=torch.int64)
    out = torch.empty(module.rows, module.cols, dtype=dtype)  # [N, K]
    lib.idefics3_dequantize(table.data_ptr(), module.rows, module.cols, out.data_ptr(), _OUT_DTYPES[dtype],
                            torch.get_num_threads())
    return out


# Up to this many rows a call multiplies the stored codes directly (the decode step's products,
# cpu_decode.quant_linear) instead of dequantising: measured on a [576 -> 1536] int4 matrix, 2 threads, the
# streamed product (int8 inputs) took 0.03 / 0.09 / 0.15 ms at 1 / 8 / 16 rows against 0.18 ms for dequantise
# and multiply; with the exact fp32 inputs used here, ~1.5x the streamed times, so up to 8 rows.
# A prompt's last-token head (one row of a 49k-row matrix) is the case that matters most.
STREAM_ROWS = 8


class FastQuantLinear(QuantLinear):
    """QuantLinear whose inference on CPU dequantises through `dense_weight`, or for a few rows multiplies the
    codes directly where the AVX-512 build has the products (the plain forward otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in _OUT_DTYPES or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // max(self.cols, 1)
        lib = _streaming_library() if rows <= STREAM_ROWS else None
        if lib is not None:
            flat = x.reshape(rows, self.cols)  # [R, K]
            # fp32 inputs: a prompt's logits stay those of the plain path (int8 inputs are decode's trade-off)
            y = cpu_decode.quant_linear(lib, self, flat, False).to(x.dtype)  # [R, N]
            y = y.reshape(*x.shape[:-1], self.rows)  # [..., N]
            return y if bias is None else y + bias
        return F.linear(x, dense_weight(self, x.dtype), bias)


def _streaming_library():
    """The AVX-512 build (the one with idefics3_quant_linear) where this machine runs it, else None."""
    lib = library()
    return lib if lib is not None and cpu_decode.variant_for(torch.bfloat16) == "avx512" else None


def quant_replacement() -> Callable[[str, nn.Module], nn.Module | None]:
    """The `replace_modules` choice that makes every QuantLinear (exact class) a FastQuantLinear view."""
    return lambda name, module: view_as(module, FastQuantLinear) if type(module) is QuantLinear else None
