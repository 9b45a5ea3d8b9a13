"""Prefill on quantised weights: each QuantLinear call runs the method measured fastest for its row count.

A prompt of T tokens multiplies every matrix by T rows. For a long prompt that is bound by arithmetic, not by
the bytes of the weights, so the fastest way is to make the dense matrix once for the call (`dense_weight`: the
decode library's `idefics3_dequantize`, one vectorised pass on all threads, bit-equal to torch's five) and hand
it to the same oneDNN / AMX multiply a bf16 model uses. For a short one, writing and reading back a dense copy
of every matrix costs more than the products: a 20-token text prompt's first token came 1.4x later than bf16's.
Then the codes are multiplied where they are: streamed once for all rows by the decode step's products, or, on
AMX, dequantised to bf16 a block of 32 rows at a time in cache and multiplied on the tile unit
(cpu_decode_quant_amx.h). For int8 with one scale per output channel, aten's `_weight_int8pack_mm` reads our
codes as they are and is a fourth candidate (fastest at one row: 23 against 31 us for [1536, 576]; 2-14x slower
than tiles or dense from 20 rows); in bf16 it is only used where K is a multiple of 32, since torch 2.13 returns
garbage for other K, and on each shape it is checked against the dense product before it is timed. aten's int4
product (`_weight_int4pack_mm_for_cpu`) is not a candidate: it needs its own copy of the codes in blocks of
output rows (the memory int4 saves, spent again) and measured 1.4-13x slower than tiles or dense from 20 rows
on. Which method a call takes is measured per format, shape and row count at load
(`plan_for`, cached per machine by calibrate.py), so no path is installed where it measured slower.

The backend (backend.py) puts `FastQuantLinear` views (model/replace.py) in place of the model's QuantLinears:
same buffers, names and state_dict keys, a forward that takes these paths for inference on CPU tensors of fp32
or bf16 and the plain one otherwise (autograd recording, other devices, or no library here). Nothing dense is
kept between calls: the memory a quantised model saves stays saved. The vision encoder's fused layers
(cpu_vision.py) dequantise their QuantLinears through `dense_weight` too (1024 rows per frame: always dense).

Measured: bench/quant.py (time to first token of each format against bf16, same run).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import ENV_ISA
from ..model.replace import view_as
from ..quant.modules import QuantLinear
from . import calibrate, cpu_decode

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
    out = torch.empty(module.rows, module.cols, dtype=dtype)  # [N, K]
    lib.idefics3_dequantize(cpu_decode.weight_table(module).data_ptr(), module.rows, module.cols, out.data_ptr(),
                            _OUT_DTYPES[dtype], torch.get_num_threads())
    return out


# The ways a call of R rows can run, fastest first for few rows:
# - "streamed": the decode step's products over the stored codes (cpu_decode.quant_linear), fp32 inputs so that
#   a prompt's logits stay the dense path's; either build (AVX-512, AVX2); cost grows with R from the start;
# - "tiles": blocks of 32 rows dequantised to bf16 in cache and multiplied on AMX tiles
#   (cpu_decode_quant_amx.h); bf16 inputs, K a multiple of 32, a CPU with AMX;
# - "aten": aten's _weight_int8pack_mm, for int8 per output channel only (the module docstring);
# - "dense": the whole matrix dequantised (dense_weight), then the dense multiply (oneDNN): best for long prompts.
# Which one is measured per format, shape and row count (`plan_for`); on a 2-core Xeon (AMX) with SmolVLM-256M's
# int4 decoder, 30 layers: 1 row 4.3 / 8.1 / 13.2 ms, 20 rows 26.9 / 11.6 / 13.3 ms, 881 rows - / 125 / 90 ms
# (bf16 weights: 6.7, 7.2 and 73 ms).
METHOD_NOTES = {"streamed": "the codes streamed once for all rows",
                "tiles": "AMX tiles over bf16 blocks dequantised in cache", "aten": "aten's int8 product",
                "dense": "the matrix dequantised in C, then the dense multiply"}  # what `idefics3 info` says
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024)  # the row counts measured; a call takes its nearest (log scale)
STREAM_MAX_ROWS = 64                     # "streamed" is not even timed beyond this
CALIBRATION_ROWS = 512                   # output rows a timing uses: every method's time is linear in them


@dataclass(frozen=True)
class PrefillPlan:
    """The method of each row bucket for one matrix format and shape, and why."""

    methods: tuple[str, ...]  # one per ROW_BUCKETS
    reason: str

    def method(self, rows: int) -> str:
        i = min(range(len(ROW_BUCKETS)), key=lambda j: abs(math.log(max(rows, 1) / ROW_BUCKETS[j])))
        return self.methods[i]


class FastQuantLinear(QuantLinear):
    """QuantLinear whose inference on CPU runs the method its plan gives for the call's row count (the plain
    forward for autograd, other devices and dtypes)."""

    plan: PrefillPlan | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in _OUT_DTYPES or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // max(self.cols, 1)
        plan = self.plan or default_plan(self, x.dtype)
        y = run(plan.method(rows), self, x.reshape(rows, self.cols))  # [R, N]
        y = y.reshape(*x.shape[:-1], self.rows)  # [..., N]
        return y if bias is None else y + bias


def run(method: str, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x [R, K] times the module's matrix by one method (falling back to "dense" where it cannot run): [R, N]."""
    if method == "streamed" and (lib := library()) is not None:  # either build has the product
        return cpu_decode.quant_linear(lib, module, x, False).to(x.dtype)
    if method == "tiles" and _tiles_run(module, x.dtype):
        x = x.contiguous()
        y = torch.empty(x.shape[0], module.rows, dtype=torch.bfloat16)
        table = cpu_decode.weight_table(module)
        if _tile_library().idefics3_quant_matmul_amx(table.data_ptr(), module.rows, module.cols, x.data_ptr(),
                                                       x.shape[0], y.data_ptr(), torch.get_num_threads()) == 0:
            return y
    if method == "aten" and _aten_run(module, x.dtype):
        return torch._weight_int8pack_mm(x.contiguous(), module.qweight, module.scales.reshape(-1).to(x.dtype))
    return F.linear(x, dense_weight(module, x.dtype))


def methods(module: QuantLinear, dtype: torch.dtype) -> list[str]:
    """The methods that can run this module's calls in `dtype` on this machine."""
    return [*(["streamed"] if library() is not None else []),
            *(["tiles"] if _tiles_run(module, dtype) else []), *(["aten"] if _aten_run(module, dtype) else []),
            "dense"]


def _aten_run(module: QuantLinear, dtype: torch.dtype) -> bool:
    """Whether aten's int8 product takes this module: int8 per output channel, CPU tensors, and in bf16 a K that
    is a multiple of 32 (torch 2.13's bf16 kernel is wrong for other K: tests/kernels/test_quant_prefill.py). In
    bf16 it takes the fp16 scales rounded to bf16: a row's outputs move by at most 2^-9 of their size, the bf16
    output's own rounding."""
    spec = module.spec
    return (spec.bits == 8 and spec.group_size == 0 and dtype in _OUT_DTYPES and module.qweight.device.type == "cpu"
            and module.qweight.is_contiguous() and (dtype != torch.bfloat16 or module.cols % 32 == 0))


def default_plan(module: QuantLinear, dtype: torch.dtype) -> PrefillPlan:
    """Without measuring (IDEFICS3_CALIBRATE=0): our kernels wherever they run, "streamed" up to 4 rows and
    "tiles" up to 64, else "dense"."""
    can = methods(module, dtype)
    pick = [("streamed" if rows <= 4 and "streamed" in can else "tiles" if rows <= 64 and "tiles" in can
             else "dense") for rows in ROW_BUCKETS]
    return PrefillPlan(tuple(pick), f"{calibrate.ENV_CALIBRATE}=0: not measured")


def plan_for(module: QuantLinear, dtype: torch.dtype) -> PrefillPlan:
    """The fastest method of each row bucket for this module's format and shape in `dtype`, measured on its first
    CALIBRATION_ROWS output rows (remembered per machine: kernels/calibrate.py)."""
    if not calibrate.calibrating():
        return default_plan(module, dtype)
    probe = _first_rows(module, CALIBRATION_ROWS)
    gen = torch.Generator().manual_seed(0)
    chosen, reasons = [], []
    usable = methods(module, dtype)
    if "aten" in usable and not _aten_agrees(probe, dtype):
        usable.remove("aten")
        reasons.append("aten's int8 product left out: it disagreed with the dense product here")
    for rows in ROW_BUCKETS:
        x = torch.randn(rows, module.cols, generator=gen).to(dtype)
        can = [m for m in usable if m != "streamed" or rows <= STREAM_MAX_ROWS]
        if len(can) == 1:
            chosen.append(can[0])
            continue
        choice, reason = calibrate.fastest(
            ("quantised prefill", module.spec.name, probe.rows, module.cols, rows, dtype),
            {m: functools.partial(run, m, probe, x) for m in can}, f"{rows} rows")
        chosen.append(choice)
        reasons.append(reason.removeprefix("measured on "))
    shape = f"{module.spec.name} [{module.rows}, {module.cols}]"
    return PrefillPlan(tuple(chosen), f"{shape}, measured on its first {probe.rows} rows: " + "; ".join(reasons))


def _aten_agrees(module: QuantLinear, dtype: torch.dtype) -> bool:
    """Whether aten's int8 product gives the dense product on this shape, to the output's rounding: the K rule of
    `_aten_run` was found on torch 2.13 and one CPU, and aten's kernel differs by torch version and ISA."""
    x = torch.randn(8, module.cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = run("dense", module, x).float()
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * ref.abs().max().item() + 1e-6
    return bool(((run("aten", module, x).float() - ref).abs() <= tol).all())


def _first_rows(module: QuantLinear, n: int) -> QuantLinear:
    """A QuantLinear over the module's first n output rows (views of its tensors), or the module itself."""
    if module.rows <= n:
        return module
    part = QuantLinear(module.cols, n, module.spec, device="cpu")
    part.set_quantised({name: t[:n] for name, t in module.quant_tensors().items()}, "calibration rows")
    return part


def _tile_library():
    """The AVX-512 build where it has AMX code and Linux grants the tile state, else None."""
    return _tile_library_at(os.environ.get(ENV_ISA, ""))


@functools.cache
def _tile_library_at(forced_isa: str):
    lib = library()
    avx512 = lib is not None and cpu_decode.variant_for(torch.bfloat16) == "avx512"
    return lib if avx512 and lib.idefics3_amx_init() == 0 else None


def _tiles_run(module: QuantLinear, dtype: torch.dtype) -> bool:
    tensors = module.quant_tensors().values()
    return (dtype == torch.bfloat16 and module.cols % 32 == 0 and _tile_library() is not None
            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors))


def quant_replacement(dtype: torch.dtype) -> Callable[[str, nn.Module], nn.Module | None]:
    """The `replace_modules` choice that makes every QuantLinear (exact class) a FastQuantLinear view with the
    plan of its format and shape for inputs of `dtype` (one measurement per distinct format and shape)."""
    plans: dict[tuple, PrefillPlan] = {}

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) is not QuantLinear:
            return None
        view = view_as(module, FastQuantLinear)
        key = (module.spec, module.rows, module.cols)
        if key not in plans:
            plans[key] = plan_for(module, dtype)
        view.plan = plans[key]
        return view
    return replace
