"""Each kernel test sees the kernels' fallback reasons logged afresh (they are logged once per process);
`attention_kernel` skips a test where the attention kernel cannot run."""

from __future__ import annotations

import pytest

from idefics3.kernels import build, cpu_attention


@pytest.fixture(autouse=True)
def fresh_log_once():
    build._logged.clear()
    yield
    build._logged.clear()


@pytest.fixture(scope="session")
def attention_kernel():
    missing = build.missing_cpu_features(bf16=True)
    if missing:
        pytest.skip(f"the CPU lacks {', '.join(missing)}")
    lib = cpu_attention.load_library()
    if isinstance(lib, str):
        pytest.skip(lib)
