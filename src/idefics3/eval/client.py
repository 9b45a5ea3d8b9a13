"""Answers from any OpenAI-compatible server (`--server http://host:port/v1`): `idefics3 serve`, vLLM, TGI, ...

Each sample becomes one POST /chat/completions with one user message: the images as PNG data URLs (placed where
the prompt writes `<image>`, else before the text), greedy decoding (temperature 0) and the task's
max_tokens. `batch` requests are in flight at once, so the server's own batching sees many questions together.
The assistant prefix of a prompt style (" Answer:") cannot be sent through the chat API and is left out (a
warning says so). An answer the server refuses (HTTP 4xx, e.g. a prompt over its context) is recorded against
its sample; a server that cannot be reached, or fails (5xx) three times, stops the run, resumable later.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from .data import ImageError
from .runner import Job, OnDone

logger = logging.getLogger(__name__)
RETRIES = 3
TIMEOUT_S = 600.0


class ServerError(RuntimeError):
    """The server cannot be reached or keeps failing: the run stops."""


class ServerBackend:
    kind = "server"

    def __init__(self, url: str, batch: int = 8, api_key: str | None = None, model: str | None = None) -> None:
        if batch < 1:
            raise ValueError(f"--batch must be >= 1, got {batch}")
        self.url = url.rstrip("/")
        self.batch = batch
        self.api_key = api_key
        self.model = model or self._first_model()
        self._warned_prefix = False

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _first_model(self) -> str:
        request = urllib.request.Request(f"{self.url}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                listed = json.load(response).get("data") or []
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ServerError(f"cannot list the models of {self.url}: {err}") from err
        if not listed:
            raise ServerError(f"{self.url}/models lists no model; name one with --server-model")
        return str(listed[0]["id"])

    def message(self, job: Job) -> dict[str, Any]:
        """The chat message of a job (images as data URLs)."""
        images = [_data_url(source) for source in job.sample.images]
        text = job.prompt.text
        parts: list[dict[str, Any]] = []
        if "<image>" in text:
            pieces = text.split("<image>")
            if len(pieces) - 1 != len(images):
                raise ValueError(f"the prompt places {len(pieces) - 1} <image> but the sample has {len(images)}")
            for i, piece in enumerate(pieces):
                if i:
                    parts.append({"type": "image_url", "image_url": {"url": images[i - 1]}})
                if piece:
                    parts.append({"type": "text", "text": piece})
        else:
            parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
        return {"role": "user", "content": parts}

    def _ask(self, job: Job) -> tuple[Job, str | None, str | None]:
        if job.prompt.prefix and not self._warned_prefix:
            self._warned_prefix = True
            logger.warning("the prompt style starts the answer with %r; a chat API cannot take that, so it is left "
                           "out", job.prompt.prefix)
        try:
            body = {"model": self.model, "messages": [self.message(job)], "temperature": 0.0,
                    "max_tokens": job.max_new_tokens}
        except ImageError as err:
            return job, None, f"image: {err}"
        except ValueError as err:
            return job, None, f"prompt: {err}"
        data = json.dumps(body).encode()
        for attempt in range(RETRIES):
            request = urllib.request.Request(f"{self.url}/chat/completions", data=data, headers=self._headers())
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                    reply = json.load(response)
                return job, str(reply["choices"][0]["message"]["content"] or "").strip(), None
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                if err.code < 500:
                    return job, None, f"server: HTTP {err.code}: {detail}"
                last = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
                last = str(err)
            time.sleep(0.5 * (attempt + 1))
        raise ServerError(f"{self.url}: {last}")

    def answer(self, jobs: Iterable[Job], on_done: OnDone) -> None:
        source = iter(jobs)
        with ThreadPoolExecutor(self.batch, thread_name_prefix="idefics3-eval-client") as pool:
            running: set[Future] = set()
            try:
                while True:
                    while len(running) < self.batch:
                        job = next(source, None)
                        if job is None:
                            break
                        running.add(pool.submit(self._ask, job))
                    if not running:
                        return
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        on_done(*future.result())
            finally:
                for future in running:
                    future.cancel()


def _data_url(source: Any) -> str:
    image, _ = source.load()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
