"""`idefics3 eval --server`: against our own server the answers equal the local engine's; against a scripted
OpenAI-compatible server the request is what the chat API expects, scores come out of the official metrics,
refused samples are recorded, and an unreachable server stops the run with one clear line."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import idefics3
from eval.layouts import docvqa
from idefics3.cli import main
from live_server import free_port, start, stop

pytestmark = pytest.mark.skipif(not (idefics3.DEMO_MODEL / "config.json").is_file(), reason="no built-in model")
SHAPES = ["--task", "shapes", "--count", "18", "--no-progress"]


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_our_server_gives_the_local_engines_answers(tmp_path):
    from idefics3.serving.server import ServeOptions

    live = start(ServeOptions(model=str(idefics3.DEMO_MODEL), port=free_port(), dtype="fp32", max_batch=8))
    try:
        assert main(["eval", *SHAPES, "--server", live.v1, "-o", str(tmp_path / "server")]) == 0
    finally:
        stop(live)
    assert main(["eval", *SHAPES, "--model", str(idefics3.DEMO_MODEL), "--dtype", "fp32", "--threads", "1",
                 "-o", str(tmp_path / "local")]) == 0
    server = jsonl(tmp_path / "server" / "shapes-seed1000.jsonl")
    local = jsonl(tmp_path / "local" / "shapes-seed1000.jsonl")
    assert [r["answer"] for r in server] == [r["answer"] for r in local]
    result = json.loads((tmp_path / "server" / "shapes-seed1000.json").read_text())
    assert result["model"]["backend"] == "server" and result["model"]["server"] == live.v1


class _Scripted(BaseHTTPRequestHandler):
    """A server answering DocVQA's "box i" questions with "Answer i." (box 2: refused with a 400)."""

    seen: list = []

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((body, self.headers.get("Authorization")))
        text = body["messages"][0]["content"][-1]["text"]
        box = text.split("box ")[1].split("?")[0]
        if box == "2":
            return self._reply(400, {"error": {"message": "prompt too long", "type": "invalid_request_error"}})
        self._reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": f" Answer {box}."},
                                       "finish_reason": "stop"}]})


def test_a_scripted_server_scores_and_records_refusals(tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    data = docvqa(tmp_path / "DocVQA", n=6)
    try:
        code = main(["eval", "--task", "docvqa", "--data", str(data), "--server", url, "--api-key", "k",
                     "--batch", "3", "--no-progress", "-o", str(tmp_path / "out")])
    finally:
        server.shutdown()
    assert code == 0, capsys.readouterr().err
    body, auth = _Scripted.seen[0]
    assert auth == "Bearer k" and body["model"] == "scripted" and body["temperature"] == 0.0
    assert body["max_tokens"] == 32
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1]["text"].endswith("\nAnswer the question using a single word or phrase.")
    records = jsonl(tmp_path / "out" / "docvqa-validation.jsonl")
    assert records[2]["error"].startswith("server: HTTP 400") and records[0]["answer"] == "Answer 0."
    result = json.loads((tmp_path / "out" / "docvqa-validation.json").read_text())
    assert result["score"] == 100.0 and result["scored"] == 5 and result["errors"] == {"server": 1}


def test_an_unreachable_server_is_one_clear_error(tmp_path, capsys):
    code = main(["eval", "--task", "shapes", "--count", "2", "--server", f"http://127.0.0.1:{free_port()}/v1",
                 "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("idefics3: error: cannot list the models of http://127.0.0.1:")
