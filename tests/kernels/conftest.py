"""Each kernel test sees the kernels' fallback reasons logged afresh (they are logged once per process)."""

from __future__ import annotations

import pytest

from idefics3.kernels import build


@pytest.fixture(autouse=True)
def fresh_log_once():
    build._logged.clear()
    yield
    build._logged.clear()
