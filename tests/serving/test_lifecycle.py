"""The real `idefics3 serve` process: startup, a graceful drain on SIGTERM, the request log, the bind, bad flags.

This is what an operator and an orchestrator see, so it runs the command line as a subprocess (in its own process
group, killed in a `finally`) rather than the app in a thread: /health goes from 503 "loading" to 200 once the model
is in; on SIGTERM it answers 503 "draining" at once, new requests get 503, while a stream that was already running
still gets every chunk and `[DONE]`; the process then exits 0 as soon as that stream is done, well within
--shutdown-timeout. Its stderr holds one line per request (id, prompt and generated tokens, time to first token,
total time). The process binds to 127.0.0.1 unless told otherwise. The stream asks for thousands of tokens because
the tiny checkpoint makes about 1000 a second on one CPU thread: 200 would be over before the signal lands.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from live_server import free_port

SHUTDOWN_TIMEOUT = 20
LONG = 2000  # tokens of the stream that is running when SIGTERM comes (1 to 3 s)


def cli_env() -> dict:
    """No API key from the environment; one torch thread: on 2 shared cores, torch's spinning worker threads can
    slow a busy server down a hundredfold, which would turn a 2 s stream into minutes."""
    env = {k: v for k, v in os.environ.items() if k != "IDEFICS3_API_KEY"}
    return {**env, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def get(port: int, path: str, timeout: float = 5) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        text = resp.read().decode()
        return resp.status, json.loads(text) if text.startswith("{") else text
    finally:
        conn.close()


def post(port: int, path: str, body: dict) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


class Stream(threading.Thread):
    """A streaming chat request read event by event, with the time each event arrived."""

    def __init__(self, port: int, body: dict) -> None:
        super().__init__(daemon=True)
        self.port, self.body = port, body
        self.events: list[tuple[float, str]] = []
        self.status: int | None = None
        self.first = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(self.body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.status = resp.status
            while line := resp.readline():
                if line.startswith(b"data: "):
                    self.events.append((time.monotonic(), line[6:].strip().decode()))
                    self.first.set()
            conn.close()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err
        finally:
            self.first.set()


def non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent, it only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.fixture
def server(tiny_checkpoint, tmp_path):
    """A started `idefics3 serve` on a free port: (process, port, stderr path, /health answers while loading)."""
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "idefics3.cli", "serve", "--model", str(tiny_checkpoint),
                                 "--port", str(port), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=cli_env(), start_new_session=True)
    try:
        early = []
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                status, body = get(port, "/health")
            except OSError:  # not listening yet
                time.sleep(0.05)
                continue
            if status == 200:
                break
            early.append((status, body))
            time.sleep(0.02)
        yield proc, port, log, early
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_serve_binds_loopback_drains_on_sigterm_and_exits_0(server):
    proc, port, log, early = server
    assert all(answer == (503, {"status": "loading"}) for answer in early), early  # never a 200 before it can serve
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log.read_text()
    address = non_loopback_address()
    if address is not None:  # not reachable from the network
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((address, port))

    status, models = get(port, "/v1/models")
    assert status == 200, models
    name = models["data"][0]["id"]
    stream = Stream(port, {"model": name, "messages": [{"role": "user", "content": "Tell me a long story."}],
                           "max_tokens": LONG, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
    stream.start()
    assert stream.first.wait(60) and stream.error is None and stream.status == 200, (stream.error, stream.status)

    os.killpg(proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    deadline = signalled + 5
    while (answer := get(port, "/health")) != (503, {"status": "draining"}):  # the signal is handled on the loop
        assert time.monotonic() < deadline, answer
        time.sleep(0.01)
    refused = post(port, "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2})
    refused_at = time.monotonic()
    assert refused[0] == 503 and refused[1]["error"]["code"] == "draining", refused
    assert post(port, "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2})[0] == 503

    stream.join(SHUTDOWN_TIMEOUT + 10)
    assert not stream.is_alive() and stream.error is None, stream.error
    done_at = stream.events[-1][0]
    assert done_at > refused_at, "the stream ended before the drain was checked: make it longer"
    texts = [text for _, text in stream.events]
    assert texts[-1] == "[DONE]", log.read_text()
    chunks = [json.loads(text) for text in texts[:-1]]
    assert all("error" not in chunk for chunk in chunks), chunks[-3:]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    usage = chunks[-1]["usage"]
    assert finish in (["length"], ["stop"]), finish
    if finish == ["length"]:
        assert usage["completion_tokens"] == LONG
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) > 10
    assert sum(1 for t, _ in stream.events if t > signalled) > 10  # it kept streaming after the signal

    code = proc.wait(timeout=SHUTDOWN_TIMEOUT)
    exited_after = time.monotonic() - done_at
    text = log.read_text()
    assert code == 0, text
    assert exited_after < SHUTDOWN_TIMEOUT / 2, f"exit {exited_after:.1f}s after the last request finished:\n{text}"
    assert "draining" in text and "shutdown timeout" not in text, text
    assert "Traceback" not in text, text

    # one line per request: id, outcome, prompt and generated tokens, time to first token, total time
    records = re.findall(r"^idefics3: (chatcmpl-\w+) chat: (\w+), prompt (\d+) tokens \((\d+) cached\), generated "
                         r"(\d+), ttft ([\d.]+)s, total ([\d.]+)s$", text, flags=re.MULTILINE)
    by_id = {r[0]: r for r in records}
    record = by_id[chunks[0]["id"]]
    assert record[1] == "ok" and int(record[2]) == usage["prompt_tokens"]
    assert int(record[4]) == usage["completion_tokens"]
    assert 0 < float(record[5]) <= float(record[6])
    assert len(records) == 1  # the refused requests never reached the engine


def test_the_default_host_is_loopback():
    from idefics3.cli import build_parser
    from idefics3.serving.server import ServeOptions

    assert ServeOptions().host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


@pytest.mark.parametrize("flags, problem", [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--max-body-mb", "0", "--shutdown-timeout", "5"], "--max-body-mb must be > 0"),
])
def test_bad_flags_exit_nonzero_with_one_error_line(tiny_checkpoint, flags, problem):
    res = subprocess.run([sys.executable, "-m", "idefics3.cli", "serve", "--model", str(tiny_checkpoint),
                          "--port", str(free_port()), *flags], capture_output=True, text=True, env=cli_env(),
                         timeout=120)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("idefics3: error:")]
    assert len(errors) == 1 and problem in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "Uvicorn running" not in res.stderr
