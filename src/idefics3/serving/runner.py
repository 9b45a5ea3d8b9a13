"""The engine thread: the one thread that owns the model, and the thread-safe doors into it.

HTTP handlers never touch the `Engine`. They `submit` a group of requests (the n completions of one prompt)
with a `Sink`, an asyncio queue on their event loop; the engine thread adds them between steps, steps the
engine and pushes each token event into the right sink with `loop.call_soon_threadsafe`. A handler whose
client went away calls `abort`, which the engine thread applies before its next step, so the slot is free
within one step. The event loop therefore never waits on the model, and the model never waits on a client.

A failure inside a step (an out-of-memory, a kernel error) fails the sequences that step was prefilling (or,
if none, the ones it was decoding), frees their slots and keeps serving the others. Draining (SIGTERM) stops
new submissions; `wait_idle` lets the server finish what is running within its shutdown timeout.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..generation.engine import Engine
from ..generation.sequence import Request, TokenEvent
from .metrics import Metrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server queues (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class Sink:
    """Where one group's events go: items ("token", choice index, TokenEvent) or ("error", exception)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_ids: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    last_token: dict[int, float] = field(default_factory=dict)
    open: int = 0  # sequences not finished yet

    def push(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (shutdown cut the request off): nobody is listening
            pass


class EngineRunner:
    def __init__(self, engine: Engine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = Metrics(self.snapshot)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[int, tuple[Sink, int]] = {}  # seq id -> (sink, choice index)
        self._pending = 0  # groups submitted and not yet added
        self._lock = threading.Lock()
        self._state: dict[str, float] = {}
        self.draining = False
        self._stop = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="idefics3-engine", daemon=True)

    def start(self) -> None:
        self._publish()
        self._thread.start()

    # ---- doors (any thread) ------------------------------------------------------------------------
    def submit(self, requests: list[Request], sink: Sink) -> None:
        """Queue a group of requests; raises Draining or QueueFull instead of queueing."""
        with self._lock:
            if self.draining:
                raise Draining("the server is shutting down")
            if self._pending + int(self._state.get("waiting", 0)) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            self._pending += 1
            self._idle.clear()
        self._commands.put(("add", requests, sink))

    def abort(self, sink: Sink) -> None:
        self._commands.put(("abort", sink))

    def stop(self) -> None:
        self._stop = True
        self._commands.put(("wake",))
        self._thread.join(timeout=10)

    def start_draining(self) -> None:
        with self._lock:
            self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def snapshot(self) -> dict[str, float]:
        return dict(self._state)

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        while not self._stop:
            if not engine.has_work():  # before blocking: the last step may have just finished the last sequence
                with self._lock:
                    if not self._pending:
                        self._idle.set()
            try:
                self._handle(self._commands.get(timeout=None if not engine.has_work() else 0.0))
            except queue.Empty:
                pass
            while True:  # everything else that arrived
                try:
                    self._handle(self._commands.get_nowait())
                except queue.Empty:
                    break
            if not engine.has_work():
                if not self._pending:
                    self._idle.set()
                self._publish()
                continue
            prefilling = bool(engine.prefilling or engine.waiting)
            start = time.perf_counter()
            try:
                events = engine.step()
            except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
                self._fail_step(err)
                continue
            now = time.perf_counter()
            if prefilling:
                self.metrics.prefill_chunk.observe(now - start)
            self._dispatch(events, now)
            self._publish()

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, requests, sink = command
            with self._lock:
                self._pending -= 1
            ids = []
            try:
                for index, request in enumerate(requests):
                    ids.append(self.engine.add(request))
                    self._sinks[ids[-1]] = (sink, index)
            except ValueError as err:
                for sid in ids:
                    self.engine.abort(sid)
                    self._sinks.pop(sid, None)
                sink.push(("error", err))
                return
            sink.seq_ids, sink.open = ids, len(ids)
            self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
        elif kind == "abort":
            sink = command[1]
            for sid in sink.seq_ids:
                if self._sinks.pop(sid, None) is not None:
                    self.engine.abort(sid)

    def _dispatch(self, events: list[TokenEvent], now: float) -> None:
        m = self.metrics
        m.generated_tokens.inc(len(events))
        for event in events:
            entry = self._sinks.get(event.seq_id)
            if entry is None:
                continue
            sink, index = entry
            last = sink.last_token.get(index)
            if last is None:
                m.ttft.observe(now - sink.submitted)
            else:
                m.itl.observe(now - last)
            sink.last_token[index] = now
            sink.push(("token", index, event))
            if event.finish_reason is not None:
                del self._sinks[event.seq_id]
                sink.open -= 1
                if sink.open == 0:
                    m.e2e.observe(now - sink.submitted)

    def _fail_step(self, err: Exception) -> None:
        engine = self.engine
        victims = [s.id for s in engine.prefilling] or [s.id for s in engine.running]
        known = {s.id for s in (*engine.waiting, *engine.prefilling, *engine.running)}
        victims += [sid for sid in self._sinks if sid not in known]  # lost by the failed step: fail them too
        logger.exception("engine step failed; failing %d sequence(s) and going on", len(victims))
        failed: set[int] = set()
        for sid in victims:
            engine.abort(sid)
            entry = self._sinks.pop(sid, None)
            if entry is not None and id(entry[0]) not in failed:
                failed.add(id(entry[0]))
                entry[0].push(("error", RuntimeError(f"the engine failed on this request: {err}")))
                for other in entry[0].seq_ids:  # the group's other sequences go too
                    if self._sinks.pop(other, None) is not None:
                        engine.abort(other)

    def _publish(self) -> None:
        e = self.engine
        used = sum(s.total_len for s in e.running) + sum(s.prefilled for s in e.prefilling)
        stats = e.slots.stats
        cache = e.encoder_cache
        looked = (cache.hits + cache.misses) if cache is not None else 0
        self._state = {
            "waiting": len(e.waiting), "running": e.in_flight,
            "kv_usage": used / (e.cache.max_batch * e.cache.max_seq_len),
            "prefix_hit_rate": stats.hits / stats.lookups if stats.lookups else 0.0,
            "prefix_reused_tokens": stats.reused_tokens,
            "prefix_token_rate": stats.reused_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0,
            "encoder_hit_rate": cache.hits / looked if looked else 0.0,
            "encoder_hits": cache.hits if cache is not None else 0,
            "free_slots": len(e.free_slots), "slots": e.cache.max_batch,
        }


def describe(engine: Engine) -> dict[str, Any]:
    """The engine's settings, for the startup log."""
    return {"max_batch": engine.max_batch, "slots": engine.cache.max_batch, "max_seq_len": engine.max_seq_len,
            "max_prefill_chunk": engine.max_prefill_chunk, "kv_cache_mib": engine.cache.nbytes() / 2**20}
