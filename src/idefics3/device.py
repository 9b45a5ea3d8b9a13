"""Which dtype to run in on this machine: bf16 where the hardware computes it natively, else a safe fallback.

On CPUs, bf16 halves the bytes every decode step reads, but it only pays where the CPU has bf16
instructions (AVX512-BF16 or AMX on x86, the BF16 extension on Arm); elsewhere PyTorch emulates it
slowly, and fp32 is the better choice. The probe reads the CPU flags once.

The x86 instruction-set level (`cpu_isa`: none < avx2 < avx512 < avx512_bf16 < amx) is what the kernels and
the dtype choice go by. IDEFICS3_CPU_ISA=avx2 (or any lower level) makes this machine behave as one that stops
there (an AVX2 laptop on an AMX server, say), so every path can be tested and benchmarked anywhere; a level
above what the CPU has is refused with the CPU's own level named.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch

log = logging.getLogger(__name__)


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo ("avx512f", "avx512_bf16", ...); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) ...", "AMD EPYC ..."), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


ENV_ISA = "IDEFICS3_CPU_ISA"
# Each level and the flags it adds to the one below (cumulative).
ISA_LEVELS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    "avx512_bf16": frozenset({"avx512_bf16"}),
    "amx": frozenset({"amx_tile", "amx_bf16"}),
}


def detected_isa(flags: frozenset[str] | None = None) -> str:
    """The highest level of ISA_LEVELS whose flags (and those of every level below) this CPU has."""
    flags = cpu_flags() if flags is None else flags
    level, need = "none", frozenset()
    for name, extra in ISA_LEVELS.items():
        need = need | extra
        if not need <= flags:
            break
        level = name
    return level


def cpu_isa() -> str:
    """The ISA level the kernels may use: the CPU's, or lower where IDEFICS3_CPU_ISA asks for it."""
    found = detected_isa()
    forced = os.environ.get(ENV_ISA, "").strip().lower()
    if not forced:
        return found
    if forced not in ISA_LEVELS:
        raise ValueError(f"{ENV_ISA}={forced!r} is not one of {', '.join(ISA_LEVELS)}")
    levels = list(ISA_LEVELS)
    if levels.index(forced) > levels.index(found):
        raise ValueError(f"{ENV_ISA}={forced} asks for more than this CPU has (it stops at {found})")
    return forced


def isa_flags() -> frozenset[str]:
    """The CPU flags that count under `cpu_isa()`: those of the levels above it are left out."""
    levels = list(ISA_LEVELS)
    above = frozenset().union(*(ISA_LEVELS[name] for name in levels[levels.index(cpu_isa()) + 1:]))
    return cpu_flags() - above


ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"), ("avx512_bf16", "AVX512-BF16"),
             ("amx_bf16", "AMX-BF16"))


def cpu_description() -> str:
    """The CPU model and the ISA extensions that decide the kernels, e.g. "AMD EPYC 9R14 (AVX2 AVX-512 ...)"."""
    flags = cpu_flags()
    isa = " ".join(name for flag, name in ISA_FLAGS if flag in flags) or "no AVX2"
    level, found = cpu_isa(), detected_isa()
    forced = f"; kernels limited to {level} by {ENV_ISA}" if level != found else ""
    return f"{cpu_model() or platform.machine() or 'unknown CPU'} ({isa}{forced})"


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (x86 avx512_bf16 / amx_bf16, Arm bf16)."""
    flags = isa_flags()
    if not cpu_flags():  # not Linux: Apple silicon from M2 has bf16; stay conservative elsewhere
        return platform.system() == "Darwin" and platform.machine() == "arm64"
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The fastest dtype that keeps the model's accuracy on `device`."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def runnable_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """`dtype`, unless it is bf16 on a CPU that would only emulate it: then fp32 (logged)."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_bf16():
        log.info("this CPU has no bf16 instructions: running in float32 instead of the checkpoint's bfloat16")
        return torch.float32
    return dtype
