"""Fixtures for the kernel tests.

A kernel test is skipped only when the kernel cannot run here by design: the CPU lacks the features it needs
(`missing_cpu_features`), or the kernels were turned off explicitly with IDEFICS3_KERNELS=0. When the CPU has
them, a kernel that does not build is a failure, with the build error, never a skip: otherwise the fast path
could vanish with the suite still green. `kernels_build` checks both kernels once for every test here;
`attention_kernel` gives a test the attention kernel (skipping where it cannot run by design).
"""

from __future__ import annotations

import os

import pytest

from idefics3.kernels import build, cpu_attention, cpu_decode

# (name, load_library, needs AVX512-BF16): the decode kernel runs fp32 and bf16 weights, attention bf16 only.
KERNELS = [("cpu_decode", cpu_decode.load_library, False), ("cpu_attention", cpu_attention.load_library, True)]


def turned_off() -> bool:
    return os.environ.get("IDEFICS3_KERNELS", "1").strip() == "0"


def why_not_here(bf16: bool) -> str | None:
    """Why a kernel is not expected to run on this machine (a reason to skip), or None when it must."""
    if turned_off():
        return "IDEFICS3_KERNELS=0: the kernels are turned off"
    missing = build.missing_cpu_features(bf16=bf16)
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def load_or_fail(name: str, load_library):
    """The loaded kernel library; a failed build on a CPU that has what the kernel needs fails the test."""
    lib = load_library()
    if isinstance(lib, str):
        pytest.fail(f"the {name} kernel did not build although the CPU has the features it needs "
                    f"(set IDEFICS3_KERNELS=0 to turn the kernels off on purpose): {lib}", pytrace=False)
    return lib


@pytest.fixture(scope="session", autouse=True)
def kernels_build():
    """Every kernel that this CPU can run builds and loads, else every kernel test fails with the build error."""
    for name, load_library, bf16 in KERNELS:
        if why_not_here(bf16) is None:
            load_or_fail(name, load_library)


@pytest.fixture(scope="session")
def attention_kernel():
    reason = why_not_here(bf16=True)
    if reason:
        pytest.skip(reason)
    return load_or_fail("cpu_attention", cpu_attention.load_library)


@pytest.fixture(scope="session")
def library():
    """The AVX-512 decode kernel (skipping where the CPU, or a forced ISA level, lacks AVX-512)."""
    reason = why_not_here(bf16=False)
    if reason:
        pytest.skip(reason)
    return load_or_fail("cpu_decode", cpu_decode.load_library)
