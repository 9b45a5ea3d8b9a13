"""Compiling and loading this package's C++ kernels (cpu_decode.cpp, cpu_attention.cpp) once per machine.

The sources include no torch header and expose a plain C ABI, so they compile in a few seconds with g++
through torch's extension builder (ninja, torch's extensions cache: once per machine and source version)
and are called through ctypes. Each source is built for one ISA level (device.py's `cpu_isa`): the AVX-512
ones (F, BW, VL, DQ, with AVX512-BF16 for bf16 weights, and AMX tile code where the compiler has it: the
source guards it by __AMX_BF16__ and checks the CPU at run time) and cpu_decode_avx2.cpp for CPUs that stop
at AVX2 + FMA + F16C. `missing_cpu_features` says what this CPU (at its forced level) lacks.
`IDEFICS3_KERNELS=0` turns every kernel off. A failed build is not an error: `compile_library` returns the
reason and the backend (backend.py) records it and keeps the plain PyTorch path for that op. The first build
on a machine logs one line at INFO saying so (the CLI shows it), since it makes the first load a few seconds
slower.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from pathlib import Path

from ..device import isa_flags

log = logging.getLogger(__name__)

ENV_SWITCH = "IDEFICS3_KERNELS"
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni",
          "-mfma"]
AMX_CFLAGS = ["-mamx-tile", "-mamx-bf16"]  # tried first; a compiler without them builds the rest
AVX2_CFLAGS = ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


def kernels_enabled() -> bool:
    """False when the user turned the kernels off with IDEFICS3_KERNELS=0."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def missing_cpu_features(bf16: bool) -> list[str]:
    """The CPU features the kernels need (AVX512-BF16 too for bf16 weights) that this CPU lacks."""
    flags = isa_flags()
    missing = [f for f in REQUIRED_FLAGS if f not in flags]
    return missing + (["avx512_bf16"] if bf16 and "avx512_bf16" not in flags else [])


def _built_before(name: str, source: Path) -> bool:
    """Whether torch's extension cache already holds a build of `name` newer than its source."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = Path(_get_build_directory(name, verbose=False))
    except Exception:  # noqa: BLE001 - only decides whether to print a notice
        return False
    mtime = source.stat().st_mtime
    return any(lib.stat().st_mtime >= mtime for lib in folder.glob(f"{name}*.so"))


@functools.cache
def compile_library(name: str, source: Path, cflags: tuple[str, ...] = tuple(CFLAGS),
                    optional: tuple[str, ...] = ()) -> ctypes.CDLL | str:
    """The compiled library of `source` (built once per machine, loaded once per process), or why it could not
    be built. `optional` flags are tried first and dropped if the compiler refuses them (the build then gets
    another name, so both can sit in torch's extension cache)."""
    if optional:
        lib = compile_library(name + "_" + "_".join(f.lstrip("-m").replace("-", "") for f in optional), source,
                              cflags + optional)
        if not isinstance(lib, str):
            return lib
        log.debug("%s without %s: %s", source.name, " ".join(optional), lib)
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        if not _built_before(name, source):
            log.info("compiling CPU kernels (%s), once per machine ...", source.name)
        start = time.perf_counter()
        path = load(name=name, sources=[str(source)], extra_cflags=list(cflags), extra_ldflags=["-fopenmp"],
                    is_python_module=False)
        lib = ctypes.CDLL(path)
    except Exception as e:  # no compiler, no ninja, a failed build: the plain path stays
        detail = str(e).strip().splitlines()
        return f"the kernel {source.name} did not build ({type(e).__name__}: {detail[-1] if detail else ''})"
    log.debug("kernel %s ready in %.1f s (%s)", source.name, time.perf_counter() - start, path)
    return lib
