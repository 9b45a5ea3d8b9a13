"""Serving benchmark: `idefics3 serve` against `transformers serve --continuous-batching`, one checkpoint, one run.

Workload: a SmolVLM-256M-shaped checkpoint (real configuration, seeded random bf16 weights, the real SmolVLM
processor files; the folder bench/speed.py writes). Both servers run at once, each in its own process group on a
free loopback port, with the same thread count (OMP_NUM_THREADS); the client (asyncio + raw streaming HTTP, so
each SSE chunk is timed as it arrives) sends OpenAI chat requests, streaming with
`stream_options.include_usage`, temperature 0 and a fixed `max_tokens`. Each request carries its own
photo-like image (seeded, never repeated, so no encoder or prefix cache can answer for it) as a base64
data: URI. The servers take turns: for each concurrency level, ours then transformers'; `--rounds` repeats it all.
The machine is shared: before each measurement the bench waits (up to `--quiet-wait` s) until both servers are
idle and other processes leave the CPUs, and each figure comes with `noise`, the cores other processes took
while it was measured (from /proc/stat less the servers' and the client's own CPU time).

- Throughput levels (`--concurrency 1,4,16`): `--requests` requests per level for ours and `--transformers-requests`
  for transformers (each at least the concurrency), sent by that many closed-loop clients. Printed per server and
  level: generated tokens/s (completion tokens from the usage chunks / the level's wall time), TTFT p50/p99
  (sending to the first content chunk) and inter-token latency p50/p99 (gaps between a stream's content chunks;
  p99 of a few samples is close to their maximum). With `--tiles low` (the default) the image is one 512 px
  frame for both servers: the request sends `image_url.detail: "low"` (ours) and
  `chat_template_kwargs: {"processor_kwargs": {"do_image_splitting": false}}` (transformers ignores `detail`),
  so both get the same prompt; ours refuses fields it does not know (HTTP 400), so after the warm-up says so it
  gets the same body without that one. The table's "prompt" column (usage.prompt_tokens) shows both prompts.
  `--tiles full` sends the images tiled (a 4:3 image is 13 frames at any size: the processor scales the longest
  edge to 2048 first), which takes minutes per level on transformers' side. At 32 new tokens the image's
  encoding and prefill are about half of a request's time; the report prints the throughput ratio that leaves
  at most if that compute-bound part gains nothing from batching.
- Stall: `--streams` text-only streams decode (`--stall-max-tokens`), then one request with a `--stall-image-size`
  image at full detail (1024x768: 4x3 tiles + the global image = 13 frames) arrives. Printed: the longest gap
  between chunks of the streams that were already running, from its arrival until its first content chunk (the
  streams are then closed; `--stall-timeout` closes the window sooner), against their gaps before it, and for ours
  the prefill-chunk time from /metrics (`idefics3_prefill_chunk_seconds`, differenced over the scenario; its
  largest chunk is bounded by the smallest histogram bucket that holds them all).
- Multi-turn (ours only): a conversation about one 13-frame image; TTFT of the first turn against the second
  (the second request resends the first turn, the answer and a new question: the prefix cache's case).

transformers serve 5.24 (`transformers serve FOLDER --continuous-batching`: the folder is loaded before /health
answers and requests name it as their model) batches only text-only models: for this VLM it logs
`CB: False` for every request and runs them one at a time on one inference thread, and it decodes each
request's image on its event loop, which holds up the other streams meanwhile. The bench counts the `CB:` lines
of its log. It sends no `data: [DONE]` (the stream just ends) and always sends usage in its last chunk.

Targets (PASS/FAIL): ours at the highest concurrency >= 4x ours at 1, and >= 3x transformers at the highest;
second-turn TTFT <= 15% of the first; longest stall <= one prefill chunk. Usage:

    python bench/serve.py [--concurrency 1,4,16] [--requests 8] [--transformers-requests 4] [--max-tokens 32]
        [--image-size 512x384] [--tiles low|full] [--streams 4] [--rounds 1] [--threads N]
        [--max-batch N] [--max-prefill-chunk TOKENS] [--skip-transformers | --skip-ours] [--quiet-wait 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import httpx2 as httpx  # what this venv's openai client runs on
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import BENCH_DIR, machine_line  # noqa: E402

OURS, THEIRS = "idefics3", "transformers"
QUESTIONS = ["What is shown in this picture?", "Describe the colours.", "How many circles are there?",
             "What is in the top left corner?", "Is this a photo or a drawing?", "Write a caption for it.",
             "What stands out most?", "Which shapes do you see, from left to right?"]
STORIES = ["Tell me a long story about a lighthouse keeper.", "Explain how a steam engine works, step by step.",
           "Write a travel diary of a week in the mountains.", "Describe the history of the bicycle in detail.",
           "Write a long letter to a friend about your garden.", "Explain the rules of chess to a beginner.",
           "Tell the story of a ship lost at sea.", "Describe a busy market on a summer morning."]
PREFILL_METRIC = "idefics3_prefill_chunk_seconds"
TARGET_SCALING, TARGET_VS_THEM, TARGET_TURN2 = 4.0, 3.0, 0.15


# ---- images and requests --------------------------------------------------------------------------------
def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields, a few discs and sensor-like noise: compresses and resizes like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([128 + 100 * np.sin(x / (width / 10.5) + p) * np.cos(y / (height / 10.8) - p) for p in phases], -1)
    for _ in range(12):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 50, width // 6)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def data_uri(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90) if fmt == "jpeg" else image.save(buf, format="PNG")
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode()}"


def size_arg(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


class Requests:
    """Builds the request bodies; every image gets a fresh seed, so no two requests send the same picture."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.seed = args, 1000

    def image_part(self, size: tuple[int, int], low: bool) -> dict:
        self.seed += 1
        url = {"url": data_uri(photo(*size, self.seed), self.args.image_format)}
        if low:
            url["detail"] = "low"
        return {"type": "image_url", "image_url": url}

    def body(self, messages: list[dict], max_tokens: int, low: bool = False) -> dict:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if low:  # transformers serve reads no `detail`: ask its processor for one frame instead
            body["chat_template_kwargs"] = {"processor_kwargs": {"do_image_splitting": False}}
        return body

    def image_question(self, i: int, size: tuple[int, int], low: bool, max_tokens: int) -> dict:
        content = [self.image_part(size, low), {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
        return self.body([{"role": "user", "content": content}], max_tokens, low)

    def story(self, i: int, max_tokens: int) -> dict:
        return self.body([{"role": "user", "content": STORIES[i % len(STORIES)]}], max_tokens)


# ---- the streaming client -------------------------------------------------------------------------------
@dataclass
class Stream:
    """One streamed request as the client saw it (perf_counter seconds)."""

    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with content
    text: str = ""
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    ended: float | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


async def stream_chat(client: httpx.AsyncClient, base: str, body: dict, out: Stream) -> Stream:
    """POST a streaming chat request and record each content chunk's arrival into `out` as it comes (so a
    cancelled task leaves what it saw). Ends at `data: [DONE]` or at the end of the response (transformers
    serve 5.24 sends no [DONE])."""
    out.sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now, payload = time.perf_counter(), line[5:].strip()
                if payload == "[DONE]":
                    break
                msg = json.loads(payload)
                if "error" in msg:
                    out.error = str(msg["error"])[:300]
                    break
                for choice in msg.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        out.chunks.append(now)
                        out.text += piece
                if msg.get("usage"):
                    out.completion_tokens = msg["usage"].get("completion_tokens")
                    out.prompt_tokens = msg["usage"].get("prompt_tokens")
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.ended = time.perf_counter()
    return out


def new_client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=10.0), limits=limits, trust_env=False)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


# ---- servers --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"serve.py: `{name}` is not on PATH (activate the venv)")
    return found


class Server:
    """A server subprocess in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, port: int):
        self.name, self.cmd, self.env, self.log, self.port = name, cmd, env, log, port
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.model = ""
        self.body_extra_ok = True  # False when it refused chat_template_kwargs (then sent without)
        self.idle_cpu = 0.0  # CPU seconds it used while the other server was measured
        self.idle_wall = 0.0

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    async def wait_ready(self, timeout: float) -> float:
        t0 = time.perf_counter()
        async with new_client() as client:
            while time.perf_counter() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.base}/health", timeout=5)).status_code == 200:
                        models = (await client.get(f"{self.base}/v1/models", timeout=30)).json()
                        self.model = models["data"][0]["id"]
                        return time.perf_counter() - t0
                except (httpx.HTTPError, ValueError, KeyError, IndexError):
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads) so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return math.nan

    async def settle(self, timeout: float = 120.0, busy: float = 0.2) -> float:
        """Wait until the server uses under `busy` of a core over half a second (a request the client closed
        may still be running there); returns the seconds waited."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            cpu = self.cpu_seconds()
            await asyncio.sleep(0.5)
            if not (self.cpu_seconds() - cpu) / 0.5 >= busy:  # nan (no /proc) counts as settled
                break
        return time.perf_counter() - t0

    def peak_rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return math.nan

    def stop(self) -> str:
        """SIGTERM the process group, then SIGKILL it if it is still there after a few seconds; says which."""
        if self.proc is None or self.proc.poll() is not None:
            return "not running"
        pgid, t0 = self.proc.pid, time.perf_counter()  # start_new_session: the process leads its own group
        how = "exited on SIGTERM"
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            how = "did not exit on SIGTERM within 5 s: SIGKILL"
        except ProcessLookupError:
            return "gone"
        try:
            os.killpg(pgid, signal.SIGKILL)  # also whatever it left in the group
        except ProcessLookupError:
            pass
        self.proc.wait()
        return f"{how} ({time.perf_counter() - t0:.1f} s)"

    def body(self, body: dict) -> dict:
        body = {**body, "model": self.model}
        if not self.body_extra_ok:
            body.pop("chat_template_kwargs", None)
        return body


async def metrics(client: httpx.AsyncClient, server: Server) -> str | None:
    try:
        r = await client.get(f"{server.base}/metrics", timeout=10)
        return r.text if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def histogram(text: str | None, name: str = PREFILL_METRIC) -> dict | None:
    """{"sum", "count", "buckets": {le: cumulative count}} of a Prometheus histogram, label sets added up."""
    if not text:
        return None
    out: dict = {"sum": 0.0, "count": 0.0, "buckets": {}}
    found = False
    pattern = re.compile(rf"^{re.escape(name)}(_bucket|_sum|_count)(\{{[^}}]*\}})?\s+(\S+)")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        found, (kind, labels, value) = True, m.groups()
        if kind == "_bucket":
            le = re.search(r'le="([^"]+)"', labels or "")
            if le:
                key = float(le.group(1).replace("Inf", "inf"))
                out["buckets"][key] = out["buckets"].get(key, 0.0) + float(value)
        else:
            out[kind[1:]] += float(value)
    return out if found else None


def histogram_delta(before: dict | None, after: dict | None) -> dict | None:
    if after is None:
        return None
    before = before or {"sum": 0.0, "count": 0.0, "buckets": {}}
    buckets = {le: n - before["buckets"].get(le, 0.0) for le, n in after["buckets"].items()}
    count = after["count"] - before["count"]
    largest = min((le for le, n in buckets.items() if n >= count), default=math.inf) if count else math.nan
    return {"sum": after["sum"] - before["sum"], "count": count, "max_le": largest}


# ---- scenarios ------------------------------------------------------------------------------------------
async def warm_up(server: Server, reqs: Requests, args: argparse.Namespace) -> None:
    """A few small requests at once (first-batch work, lazy tables); checks the request format is accepted."""
    async with new_client() as client:
        low = args.tiles == "low"
        probe = await stream_chat(client, server.base, server.body(reqs.image_question(0, args.image_size, low, 2)),
                                  Stream())
        if probe.error and low and probe.error.startswith("HTTP 4"):
            server.body_extra_ok = False  # refused chat_template_kwargs? then send it without
            retry = await stream_chat(client, server.base,
                                      server.body(reqs.image_question(0, args.image_size, low, 2)), Stream())
            if retry.error:
                raise RuntimeError(f"{server.name} refused the request: {probe.error} / {retry.error}")
            print(f"  note: {server.name} refused chat_template_kwargs ({probe.error[:120]}); sent without it")
        elif probe.error:
            raise RuntimeError(f"{server.name} failed the warm-up request: {probe.error}")
        n = min(4, max(args.concurrency))
        bodies = [reqs.image_question(i, args.image_size, low, 4) for i in range(n)] + [reqs.story(0, 4)]
        await asyncio.gather(*(stream_chat(client, server.base, server.body(b), Stream()) for b in bodies))


async def run_level(server: Server, bodies: list[dict], concurrency: int) -> dict:
    """`concurrency` closed-loop clients send `bodies`; returns the level's figures."""
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(server.body(b))
    done: list[Stream] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            done.append(await stream_chat(client, server.base, queue.get_nowait(), Stream()))

    async with new_client() as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    errors = [s.error for s in done if s.error]
    counted = [s.completion_tokens if s.completion_tokens is not None else len(s.chunks) for s in done]
    return {"server": server.name, "concurrency": concurrency, "requests": len(done), "wall": wall,
            "tokens": sum(counted), "tok_s": sum(counted) / wall, "errors": errors,
            "usage_missing": sum(s.completion_tokens is None for s in done),
            "ttft": [s.ttft for s in done if s.ttft is not None], "itl": [g for s in done for g in s.gaps()],
            "prompt": [s.prompt_tokens for s in done if s.prompt_tokens is not None]}


async def run_stall(server: Server, reqs: Requests, args: argparse.Namespace) -> dict:
    """Text streams decode; a large image arrives; the longest gap of the running streams until its first chunk."""
    async with new_client() as client:
        hist_before = histogram(await metrics(client, server))
        streams = [Stream() for _ in range(args.streams)]
        tasks = [asyncio.create_task(stream_chat(client, server.base, server.body(reqs.story(i, args.stall_max_tokens)),
                                                 s)) for i, s in enumerate(streams)]
        image_body = server.body(reqs.image_question(0, args.stall_image_size, False, 8))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.stall_timeout + 120:  # every stream decoding, or one for 3 s
            started = [s for s in streams if len(s.chunks) >= 4]
            if len(started) == len(streams) or (started and time.perf_counter() - min(s.chunks[0] for s in started)
                                                > 3.0) or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        image, arrival = Stream(), time.perf_counter()
        image_task = asyncio.create_task(stream_chat(client, server.base, image_body, image))
        while not image.chunks and not image_task.done() and not all(t.done() for t in tasks):
            if time.perf_counter() - arrival > args.stall_timeout:
                break
            await asyncio.sleep(0.005)
        closed = time.perf_counter()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await image_task
        hist_after = histogram(await metrics(client, server))
    arrived = image.sent
    running = [s for s in streams if s.chunks and s.chunks[0] < arrived]
    stall, before = 0.0, []
    for s in running:
        times = s.chunks + ([closed] if s.ended is None or s.ended >= closed else [])  # still waiting at close
        for a, b in zip(times, times[1:]):
            if b <= arrived:
                before.append(b - a)
            elif a < closed:
                stall = max(stall, min(b, closed) - a)
    return {"server": server.name, "running": len(running), "streams": len(streams), "stall": stall,
            "before_p50": pct(before, 50), "before_max": max(before, default=math.nan), "image_ttft": image.ttft,
            "window": closed - arrived, "timed_out": not image.chunks or image.chunks[0] > closed,
            "image_prompt": image.prompt_tokens, "error": image.error,
            "prefill": histogram_delta(hist_before, hist_after), "has_metrics": hist_after is not None}


async def run_turns(server: Server, reqs: Requests, args: argparse.Namespace) -> dict:
    """First turn about a 13-frame image, then a follow-up that resends it all: TTFT of each."""
    async with new_client() as client:
        first_msg = {"role": "user", "content": [reqs.image_part(args.stall_image_size, False),
                                                 {"type": "text", "text": QUESTIONS[0]}]}
        one = await stream_chat(client, server.base, server.body(reqs.body([first_msg], args.max_tokens)), Stream())
        follow = [first_msg, {"role": "assistant", "content": one.text},
                  {"role": "user", "content": "And what colour is the largest circle?"}]
        two = await stream_chat(client, server.base, server.body(reqs.body(follow, args.max_tokens)), Stream())
    return {"ttft1": one.ttft, "ttft2": two.ttft, "prompt1": one.prompt_tokens, "prompt2": two.prompt_tokens,
            "error": one.error or two.error}


def machine_cpu_seconds() -> float:
    """CPU time all cores spent busy so far (/proc/stat: user, nice, system, irq, softirq, steal)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return math.nan


class Turns:
    """Alternation bookkeeping: the CPU the idle server burns while the other one is measured, and the CPU that
    processes other than the servers and this client took (`noise`, in cores: the machine is shared)."""

    def __init__(self, servers: list[Server]):
        self.servers = servers
        self.noise = math.nan

    async def run(self, active: Server, coro):
        cpus = [(s, s.cpu_seconds()) for s in self.servers]
        machine, me, t0 = machine_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
        try:
            return await coro
        finally:
            wall = time.perf_counter() - t0
            used = 0.0
            for s, cpu in cpus:
                used += s.cpu_seconds() - cpu
                if s is not active:
                    s.idle_cpu += s.cpu_seconds() - cpu
                    s.idle_wall += wall
            self.noise = max(0.0, machine_cpu_seconds() - machine - used - (sum(os.times()[:2]) - me)) / wall

    async def quiet(self, wait: float, busy: float = 0.3) -> None:
        """Before a measurement: wait until every server is idle (up to 120 s: a closed request may still run)
        and other processes take under `busy` of a core over half a second (up to `wait` seconds)."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < max(wait, 120.0):
            cpus, machine, me = [s.cpu_seconds() for s in self.servers], machine_cpu_seconds(), sum(os.times()[:2])
            await asyncio.sleep(0.5)
            used = [s.cpu_seconds() - c for s, c in zip(self.servers, cpus)]
            others = (machine_cpu_seconds() - machine - sum(used) - (sum(os.times()[:2]) - me)) / 0.5
            if not max(used, default=0.0) / 0.5 >= 0.2 and (not others >= busy or time.perf_counter() - t0 > wait):
                return


# ---- main -----------------------------------------------------------------------------------------------
def prepare(folder: Path) -> Path:
    from speed import prepare as speed_prepare  # the same checkpoint and processor files as bench/speed.py

    return speed_prepare(folder)


def level_line(r: dict) -> str:
    ms = lambda v: f"{1000 * v:8.0f} ms" if not math.isnan(v) else "       n/a"
    prompt = f"{statistics.median(r['prompt']):7.0f}" if r["prompt"] else "    n/a"
    return (f"{r['server']:<13}{r['concurrency']:>5}{r['requests']:>6}{prompt}{r['tokens'] / r['requests']:>8.1f}"
            f"{r['tok_s']:>9.1f}{ms(pct(r['ttft'], 50))}{ms(pct(r['ttft'], 99))}{ms(pct(r['itl'], 50))}"
            f"{ms(pct(r['itl'], 99))}{r['noise']:>7.2f}")


def secs(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.2f} s"


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


async def bench(args: argparse.Namespace, servers: list[Server]) -> None:
    reqs = Requests(args)
    turns = Turns(servers)
    for s in servers:  # one at a time, so loading does not compete
        print(f"starting {s.name}: {' '.join(s.cmd)}", flush=True)
        s.start()
        print(f"  ready in {await s.wait_ready(args.start_timeout):.1f} s, model id {s.model!r}", flush=True)
        await warm_up(s, reqs, args)
    low = args.tiles == "low"
    levels: dict[tuple[str, int], list[dict]] = {}
    stalls: dict[str, list[dict]] = {s.name: [] for s in servers}
    multi: list[dict] = []
    for rnd in range(args.rounds):
        for c in args.concurrency:
            for s in servers:
                n = max(c, args.requests if s.name == OURS else args.transformers_requests)
                bodies = [reqs.image_question(i, args.image_size, low, args.max_tokens) for i in range(n)]
                await turns.quiet(args.quiet_wait)
                r = await turns.run(s, run_level(s, bodies, c))
                r["noise"] = turns.noise
                levels.setdefault((s.name, c), []).append(r)
                err = f"  ERRORS {len(r['errors'])}: {r['errors'][0]}" if r["errors"] else ""
                print(f"round {rnd + 1} {s.name} c={c}: {r['requests']} requests, {r['tokens']} tokens in "
                      f"{r['wall']:.1f} s = {r['tok_s']:.1f} tok/s; other processes used {r['noise']:.2f} "
                      f"core(s){err}", flush=True)
        for s in servers:
            await turns.quiet(args.quiet_wait)
            r = await turns.run(s, run_stall(s, reqs, args))
            r["noise"] = turns.noise
            r["drain"] = await turns.run(s, s.settle())  # the closed streams should stop at once
            stalls[s.name].append(r)
            print(f"round {rnd + 1} {s.name} stall: {r['running']}/{r['streams']} streams running, longest gap "
                  f"{r['stall']:.3f} s (before: p50 {r['before_p50']:.3f} s), image TTFT {secs(r['image_ttft'])}, "
                  f"window {r['window']:.1f} s{' (timed out)' if r['timed_out'] else ''}, idle {r['drain']:.1f} s "
                  f"after; other processes used {r['noise']:.2f} core(s)"
                  f"{'  ERROR ' + r['error'] if r['error'] else ''}", flush=True)
        ours = next((s for s in servers if s.name == OURS), None)
        if ours is not None:
            await turns.quiet(args.quiet_wait)
            r = await turns.run(ours, run_turns(ours, reqs, args))
            multi.append(r)
            print(f"round {rnd + 1} {OURS} multi-turn: TTFT {secs(r['ttft1'])} then {secs(r['ttft2'])} "
                  f"(prompt {r['prompt1']} then {r['prompt2']} tokens); other processes used {turns.noise:.2f} "
                  f"core(s){'  ERROR ' + r['error'] if r['error'] else ''}",
                  flush=True)
    report(args, servers, levels, stalls, multi)


def report(args, servers: list[Server], levels: dict, stalls: dict, multi: list[dict]) -> None:
    names = [s.name for s in servers]
    print(f"\n{machine_line(args.threads)}")
    for s in servers:
        print(f"{s.name}: {' '.join(s.cmd[:2])} ... {' '.join(s.cmd[s.cmd.index('--host'):])}")
        if s.name == OURS:  # its settings and which kernel runs each op, as it logs them at startup
            lines = s.log.read_text(errors="replace").splitlines()
            start = next((i for i, line in enumerate(lines) if line.startswith("idefics3: serving")), None)
            for line in lines[start:start + 12] if start is not None else []:
                if line.startswith("idefics3: ") and "serving" not in line:
                    break
                print(f"  {line.strip()}")
    print(f"workload: {args.image_size[0]}x{args.image_size[1]} {args.image_format} images, tiles {args.tiles}, "
          f"max_tokens {args.max_tokens}, temperature 0, streaming; {args.rounds} round(s); "
          f"TTFT/ITL pooled over rounds, tok/s the median of the rounds; noise: the cores that other processes "
          f"took meanwhile (the most of the rounds; above ~0.2 the figures are disturbed)")
    print(f"\n{'server':<13}{'conc':>5}{'reqs':>6}{'prompt':>7}{'tok/req':>8}{'tok/s':>9}{'TTFT p50':>11}"
          f"{'TTFT p99':>11}{'ITL p50':>11}{'ITL p99':>11}{'noise':>7}")
    merged: dict[tuple[str, int], dict] = {}
    for c in args.concurrency:
        for name in names:
            runs = levels[(name, c)]
            merged[(name, c)] = m = {
                "server": name, "concurrency": c, "requests": sum(r["requests"] for r in runs),
                "tokens": sum(r["tokens"] for r in runs), "tok_s": statistics.median(r["tok_s"] for r in runs),
                "ttft": [x for r in runs for x in r["ttft"]], "itl": [x for r in runs for x in r["itl"]],
                "prompt": [x for r in runs for x in r["prompt"]], "noise": max(r["noise"] for r in runs)}
            print(level_line(m))
            if any(r["usage_missing"] for r in runs):
                print(f"  ({sum(r['usage_missing'] for r in runs)} request(s) without a usage chunk: content chunks "
                      f"counted as tokens)")
            if any(r["errors"] for r in runs):
                print(f"  ({sum(len(r['errors']) for r in runs)} failed request(s))")
    top, low_c = max(args.concurrency), min(args.concurrency)
    print()
    if OURS in names and THEIRS in names:
        for c in args.concurrency:
            a, b = merged[(OURS, c)], merged[(THEIRS, c)]
            print(f"c={c:<3} ours/transformers: tok/s {a['tok_s'] / b['tok_s']:.2f}x, TTFT p50 "
                  f"{pct(b['ttft'], 50) / pct(a['ttft'], 50):.2f}x faster, ITL p50 "
                  f"{pct(b['itl'], 50) / pct(a['itl'], 50):.2f}x shorter")
    for s in servers:
        scale = merged[(s.name, top)]["tok_s"] / merged[(s.name, low_c)]["tok_s"]
        runs = levels[(s.name, low_c)]
        per_request = sum(r["wall"] for r in runs) / sum(r["requests"] for r in runs)
        share = pct(merged[(s.name, low_c)]["ttft"], 50) / per_request
        ceiling = 1 / (share + (1 - share) / (top / low_c))
        print(f"{s.name}: c={top} / c={low_c} throughput {scale:.2f}x (the first token takes {share:.0%} of a "
              f"request's time at c={low_c}; if that compute-bound part gains nothing from batching: "
              f"{ceiling:.2f}x at most); peak RSS {s.peak_rss_mib():.0f} MiB")
    for s in servers:
        if len(servers) > 1 and s.idle_wall:
            print(f"{s.name} idle while the other ran: {s.idle_cpu:.1f} CPU-s in {s.idle_wall:.0f} s "
                  f"({s.idle_cpu / s.idle_wall:.1%} of a core)")

    print(f"\nstall: {args.streams} text streams decoding, then one {args.stall_image_size[0]}x"
          f"{args.stall_image_size[1]} image at full detail arrives")
    chunk_bound = math.nan
    for name in names:
        rs = stalls[name]
        worst = max(rs, key=lambda r: r["stall"])
        ttfts = [r["image_ttft"] for r in rs if r["image_ttft"] is not None]
        pad = " " * 15
        print(f"  {name:<13}longest gap {worst['stall']:.3f} s of the {worst['running']}/{worst['streams']} streams "
              f"running at arrival (their gaps before it: p50 {statistics.median(r['before_p50'] for r in rs):.3f} s,"
              f" max {max(r['before_max'] for r in rs):.3f} s)")
        line = (f"{pad}image: {worst['image_prompt']} prompt tokens, TTFT "
                f"{secs(statistics.median(ttfts) if ttfts else None)}")
        if any(r["timed_out"] for r in rs):
            line += f" (window closed by --stall-timeout {args.stall_timeout:.0f} s, running streams then closed)"
        print(line)
        print(f"{pad}server busy {max(r['drain'] for r in rs):.1f} s after the client closed the streams and the image "
              f"request finished (0.5 s = idle at once)")
        if name == OURS:
            deltas = [r["prefill"] for r in rs if r["prefill"] and r["prefill"]["count"]]
            if deltas:
                chunk_bound = max(d["max_le"] for d in deltas)
                total = sum(d["count"] for d in deltas)
                print(f"{pad}/metrics {PREFILL_METRIC}: {total:.0f} chunk(s), mean "
                      f"{sum(d['sum'] for d in deltas) / total:.3f} s, largest <= {chunk_bound:g} s (bucket)")
            else:
                print(f"{pad}/metrics: no {PREFILL_METRIC} "
                      f"{'samples' if any(r['has_metrics'] for r in rs) else 'histogram'} (tolerated)")

    if multi:
        ratios = [r["ttft2"] / r["ttft1"] for r in multi if r["ttft1"] and r["ttft2"]]
        t1 = statistics.median(r["ttft1"] for r in multi if r["ttft1"]) if ratios else math.nan
        t2 = statistics.median(r["ttft2"] for r in multi if r["ttft2"]) if ratios else math.nan
        ratio = statistics.median(ratios) if ratios else math.nan
        print(f"\nmulti-turn ({OURS}): first turn TTFT {t1:.2f} s ({multi[0]['prompt1']} prompt tokens), second "
              f"{t2:.2f} s ({multi[0]['prompt2']} prompt tokens): {ratio:.1%} of the first")

    print("\ntargets:")
    if OURS not in names:
        print(f"  ({OURS} skipped)")
    else:
        scale = merged[(OURS, top)]["tok_s"] / merged[(OURS, low_c)]["tok_s"]
        print(f"  {verdict(scale >= TARGET_SCALING if top > low_c else None)}  ours c={top} >= {TARGET_SCALING:g}x "
              f"ours c={low_c}: {scale:.2f}x")
        if THEIRS in names:
            vs = merged[(OURS, top)]["tok_s"] / merged[(THEIRS, top)]["tok_s"]
            print(f"  {verdict(vs >= TARGET_VS_THEM)}  ours c={top} >= {TARGET_VS_THEM:g}x transformers c={top}: "
                  f"{vs:.2f}x")
        ratio = statistics.median(ratios) if multi and ratios else math.nan
        print(f"  {verdict(None if math.isnan(ratio) else ratio <= TARGET_TURN2)}  second-turn TTFT <= "
              f"{TARGET_TURN2:.0%} of the first: {ratio:.1%}")
        stall = max(r["stall"] for r in stalls[OURS])
        print(f"  {verdict(None if math.isnan(chunk_bound) else stall <= chunk_bound)}  longest stall <= one prefill "
              f"chunk: {stall:.3f} s vs {chunk_bound:g} s")
    log_notes(servers)


def log_notes(servers: list[Server]) -> None:
    for s in servers:
        if s.name == THEIRS:
            text = s.log.read_text(errors="replace")
            cb = re.findall(r"CB: (True|False)", text)
            fallback = ("; it logged that the model does not support continuous batching (sequential generate)"
                        if "does not support continuous batching" in text else "")
            print(f"\n{THEIRS} serve log: {cb.count('False')} request(s) logged CB: False, {cb.count('True')} "
                  f"CB: True{fallback}")
    print("server logs: " + ", ".join(str(s.log) for s in servers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,16", type=lambda t: [int(x) for x in t.split(",")])
    ap.add_argument("--requests", type=int, default=8, help="requests per level for ours (at least the concurrency)")
    ap.add_argument("--transformers-requests", type=int, default=4,
                    help="requests per level for transformers serve (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=size_arg, default=(512, 384), metavar="WxH")
    ap.add_argument("--tiles", choices=["low", "full"], default="low",
                    help="low: one 512 px frame per image on both servers; full: tiled (13 frames for 4:3)")
    ap.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    ap.add_argument("--streams", type=int, default=4, help="running text streams in the stall scenario")
    ap.add_argument("--stall-image-size", type=size_arg, default=(1024, 768), metavar="WxH",
                    help="the image that arrives in the stall scenario, also the multi-turn one (full detail)")
    ap.add_argument("--stall-max-tokens", type=int, default=2048, help="max_tokens of the running text streams")
    ap.add_argument("--stall-timeout", type=float, default=30.0,
                    help="seconds after the image arrives before the stall window closes anyway")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of both servers")
    ap.add_argument("--max-batch", type=int, help="passed to idefics3 serve")
    ap.add_argument("--max-prefill-chunk", type=int, metavar="TOKENS", help="passed to idefics3 serve")
    ap.add_argument("--ours-cmd", metavar="COMMAND",
                    help="how to start ours, before --model ... (default: the venv's `idefics3 serve`)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-ours", action="store_true", help="only transformers serve (e.g. to test the harness)")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--quiet-wait", type=float, default=30.0, metavar="S",
                    help="before each measurement, wait up to S seconds for other processes to leave the CPUs")
    ap.add_argument("--dir", default=str(BENCH_DIR / "speed-smolvlm-256m"),
                    help="checkpoint folder (written if absent)")
    ap.add_argument("--log-dir", help="where the server logs go (default: a new temporary folder)")
    args = ap.parse_args()
    if args.skip_ours and args.skip_transformers:
        ap.error("nothing to run")
    print(machine_line(args.threads), flush=True)
    folder = prepare(Path(args.dir)).resolve()
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="idefics3-serve-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    servers = []
    if not args.skip_ours:
        base = shlex.split(args.ours_cmd) if args.ours_cmd else [executable("idefics3"), "serve"]
        if subprocess.run([*base, "--help"], capture_output=True, timeout=120).returncode:
            raise SystemExit(f"serve.py: `{' '.join(base)} --help` fails: is the server there yet? (--skip-ours)")
        port = free_port()
        cmd = [*base, "--model", str(folder), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--max-batch", str(args.max_batch)] if args.max_batch else []
        cmd += ["--max-prefill-chunk", str(args.max_prefill_chunk)] if args.max_prefill_chunk else []
        servers.append(Server(OURS, cmd, env, logs / "idefics3.log", port))
    if not args.skip_transformers:
        port = free_port()
        cmd = [executable("transformers"), "serve", str(folder), "--continuous-batching", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port)]
        servers.append(Server(THEIRS, cmd, env, logs / "transformers.log", port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its servers
    try:
        asyncio.run(bench(args, servers))
    finally:
        for s in servers:
            print(f"stopped {s.name}: {s.stop()}", flush=True)


if __name__ == "__main__":
    main()
