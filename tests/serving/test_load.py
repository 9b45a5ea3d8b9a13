"""Load on loopback: 64 concurrent streams of mixed kinds each get exactly the answer they get alone, and
afterwards every slot is free and memory is where it was; 32 clients dropping mid-stream leave the server
healthy with all slots free."""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
import time

import pytest

from live_server import call, image_part, picture

openai = pytest.importorskip("openai")


def kinds() -> list[dict]:
    """Request bodies: text only, one image, two images (one low detail), n=2, a stop string."""
    one = [image_part(picture(11)), {"type": "text", "text": "What is shown?"}]
    two = [image_part(picture(12, 64, 60)), image_part(picture(13), "low"), {"type": "text", "text": "Compare."}]
    return [
        {"messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 10},
        {"messages": [{"role": "user", "content": one}], "max_tokens": 8},
        {"messages": [{"role": "user", "content": two}], "max_tokens": 8},
        {"messages": [{"role": "user", "content": one}], "max_tokens": 6, "n": 2},
        {"messages": [{"role": "user", "content": "Count: one two three"}], "max_tokens": 16, "stop": ["e"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": two}], "max_tokens": 5},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": one}], "max_tokens": 7},
        {"messages": [{"role": "user", "content": "A long answer please"}], "max_tokens": 24},
    ]


async def stream_one(client, body: dict) -> tuple[list[str], list[str]]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    stream = await client.chat.completions.create(model="tiny", stream=True, temperature=0, **body)
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return [texts[i] for i in sorted(texts)], [reasons[i] for i in sorted(reasons)]


def run_all(live, bodies: list[dict]) -> list[tuple[list[str], list[str]]]:
    async def main():
        client = openai.AsyncOpenAI(base_url=live.v1, api_key="-", max_retries=0, timeout=120)
        return await asyncio.gather(*[stream_one(client, b) for b in bodies])

    return asyncio.run(main())


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def wait_idle(live, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        snap = live.state.runner.snapshot()
        if snap["running"] == 0 and snap["waiting"] == 0 and snap["free_slots"] == snap["slots"]:
            return snap
        time.sleep(0.05)
    return live.state.runner.snapshot()


@pytest.fixture(scope="module", autouse=True)
def model_name(live):
    live.state.model_name = "tiny"


def test_64_concurrent_streams_get_their_solo_answers(live):
    bodies = kinds()
    alone = [run_all(live, [b])[0] for b in bodies]  # one at a time: nothing else in the batch
    load = [bodies[i % len(bodies)] for i in range(64)]
    run_all(live, load)  # warm-up: allocator pools, caches
    wait_idle(live)
    before = rss_mib() if sys.platform == "linux" else None
    got = run_all(live, load)
    for i, answer in enumerate(got):
        assert answer == alone[i % len(bodies)], f"request {i} (kind {i % len(bodies)})"
    snap = wait_idle(live)
    assert snap["running"] == 0 and snap["free_slots"] == snap["slots"]
    if before is not None:
        assert rss_mib() - before < 64, "memory grew over a repeated load"


def test_disconnect_storm_frees_every_slot(live):
    body = json.dumps({"model": "tiny", "stream": True, "max_tokens": 400, "temperature": 0,
                       "messages": [{"role": "user", "content": [image_part(picture(21)),
                                                                 {"type": "text", "text": "Go on and on."}]}]})
    conns = []
    for _ in range(32):
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        conns.append(conn)
    for conn in conns[:8]:  # a few get to read their first chunk; the others drop while queued
        resp = conn.getresponse()
        assert resp.status == 200
        resp.fp.readline()
    for conn in conns:
        conn.sock.close()
    snap = wait_idle(live, timeout=15)
    assert snap["running"] == 0 and snap["waiting"] == 0 and snap["free_slots"] == snap["slots"], snap
    status, _, health = call(live, "GET", "/health")
    assert status == 200 and health == {"status": "ok"}
    client = openai.OpenAI(base_url=live.v1, api_key="-", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Still there?"}],
                                       max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    status, _, metrics = call(live, "GET", "/metrics")
    assert 'outcome="aborted"' in metrics
