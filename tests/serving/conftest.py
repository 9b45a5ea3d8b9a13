"""The shared live server of the serving tests (helpers in tests/live_server.py)."""

from __future__ import annotations

import pytest

from live_server import free_port, start, stop


@pytest.fixture(scope="session")
def live(tiny_checkpoint):
    """The shared server: the tiny checkpoint, 8 sequences at once, chunked prefill, prefix cache."""
    from idefics3.serving.server import ServeOptions

    server = start(ServeOptions(model=str(tiny_checkpoint), port=free_port(), dtype="fp32", max_batch=8,
                                max_seq_len=512, max_prefill_chunk=32))
    yield server
    stop(server)
