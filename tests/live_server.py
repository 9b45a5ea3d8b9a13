"""Helpers for tests of the HTTP server: start one on a free loopback port (uvicorn in a thread), raw requests,
images as data URIs. The `live` fixture (tests/serving/conftest.py) is one shared server."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str          # http://127.0.0.1:PORT
    port: int
    server: Any
    state: Any

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


def start(options) -> Live:
    from idefics3.serving.server import create_server

    server, state, loader = create_server(options, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    loader.join(timeout=120)
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert state.status == "ok", state.load_error
    live = Live(f"http://127.0.0.1:{options.port}", options.port, server, state)
    live.thread = thread
    return live


def stop(live: Live) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=20)
    if live.state.runner is not None:
        live.state.runner.stop()


def call(live: Live, method: str, path: str, body: Any = None, headers: dict | None = None, raw: bytes | None = None
         ) -> tuple[int, dict, Any]:
    """(status, headers, parsed JSON or text) of one request, with nothing in between."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = text
    return resp.status, dict(resp.getheaders()), parsed


def picture(seed: int, height: int = 40, width: int = 56) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(image: Image.Image, detail: str | None = None) -> dict:
    url = {"url": data_url(image)}
    if detail:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url}
