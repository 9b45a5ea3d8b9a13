"""Compiling and loading this package's C++ kernels (cpu_decode.cpp, cpu_attention.cpp) once per machine.

The sources include no torch header and expose a plain C ABI, so they compile in a second or so with g++
through torch's extension builder (ninja, torch's extensions cache: once per machine and source version)
and are called through ctypes. They need AVX-512 (F, BW, VL, DQ) and AVX512-BF16; `missing_cpu_features`
says what this CPU lacks. `IDEFICS3_KERNELS=0` turns every kernel off: callers check `kernels_enabled`.
A failed build is not an error: `compile_library` returns the reason, the caller logs it and keeps the
plain PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..device import cpu_flags

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_SWITCH = "IDEFICS3_KERNELS"
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
_logged: set[str] = set()


def kernels_enabled() -> bool:
    """False when the user turned the kernels off with IDEFICS3_KERNELS=0."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def missing_cpu_features(bf16: bool) -> list[str]:
    """The CPU features the kernels need (AVX512-BF16 too for bf16 weights) that this CPU lacks."""
    flags = cpu_flags()
    missing = [f for f in REQUIRED_FLAGS if f not in flags]
    return missing + (["avx512_bf16"] if bf16 and "avx512_bf16" not in flags else [])


def log_once(level: int, message: str) -> None:
    """Log `message` the first time only (a fallback reason would otherwise repeat on every call)."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


@functools.lru_cache(maxsize=None)
def compile_library(name: str, source: Path) -> ctypes.CDLL | str:
    """The compiled library of `source` (built once per machine, loaded once), or why it could not be built."""
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        start = time.perf_counter()
        path = load(name=name, sources=[str(source)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                    is_python_module=False)
        lib = ctypes.CDLL(path)
    except Exception as e:  # no compiler, no ninja, a failed build: the plain path stays
        detail = str(e).strip().splitlines()
        return f"the kernel {source.name} did not build ({type(e).__name__}: {detail[-1] if detail else ''})"
    log.info("kernel %s ready in %.1f s (%s)", source.name, time.perf_counter() - start, path)
    return lib


def swap_classes(model: nn.Module, table: dict[type, type]) -> int:
    """Give each module of `model` whose exact class is a key of `table` the class it maps to (a subclass with a
    faster forward: the same object, parameters, names and hooks), in place and idempotently; returns how many
    changed. Nothing changes with IDEFICS3_KERNELS=0."""
    if not kernels_enabled():
        return 0
    changed = 0
    for module in model.modules():
        faster = table.get(type(module))
        if faster is not None:
            module.__class__ = faster
            changed += 1
    return changed


def derived(owner: object, name: str, sources: list[torch.Tensor], make: Callable[[], T]) -> T:
    """`make()` (something computed from `sources`, like a stacked or repacked copy of weights), kept on `owner`
    under `name` and made again whenever a source tensor is replaced or changed in place."""
    key = tuple((t.data_ptr(), t._version) for t in sources)
    cached = getattr(owner, name, None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, make())
        setattr(owner, name, cached)
    return cached[1]
