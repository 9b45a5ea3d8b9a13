"""Answers for many samples at once through the continuous-batching engine, greedy and deterministic.

    backend = EngineBackend(model, processor, batch=16)
    backend.answer(jobs, on_done)        # on_done(job, answer, None) or on_done(job, None, reason)

A worker thread prepares inputs ahead (images decoded and tiled, prompts tokenized: inputs.py) while the engine
steps; up to `batch` sequences are in flight and as many more wait, so a finished sequence's slot is refilled at
the next step. On a CPU whose torch threads leave cores idle, the worker also runs the vision encoder over each
new image, into the engine's encoder cache, so that encoding the next pages overlaps decoding the current ones
(torch's thread count is one setting per process, so this is a second stream of work on the idle cores):
measured with bench/eval.py against --no-encode-ahead (64 DocVQA samples, SmolVLM-256M shapes, bf16, 2-core
Xeon), +21-23% samples/s with one torch thread; with both cores busy it cost 5%, so it is off there. The engine
then finds the features cached; an image encoded alone gives the same features whatever
it is batched with. Questions about the same image share its frames (InputBuilder), its encoded features (the
engine's encoder cache, keyed by frame digest) and the keys and values of their common prompt prefix (the
image comes first): a question whose image another question is still prefilling is held back until that one
has its first token, so the engine's prefix cache copies the shared prefix instead of computing it again
(DocVQA asks about four questions per page). Decoding is greedy (temperature 0) with the checkpoint's stop tokens.
Jobs enter the engine in order and as soon as there is room, never depending on how fast the worker thread is,
so the same data gives the same batches, step by step, every run. In fp32 a sample's answer does not depend on
what else is in the batch (resumed and sharded runs are tested to give one run's answers); in bf16 the batched
kernels round differently from one sequence alone, so where two tokens are nearly tied an answer can differ
between batch compositions (as in any batched server).

A sample whose image cannot be read, or whose prompt cannot be built or does not fit the engine, is reported
through `on_done` with the reason and the run goes on. Anything else (an error inside a step) propagates: the
records written so far stay, and `--resume` continues.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..device import usable_cores
from ..generation.encoder_cache import EncoderCache
from ..generation.engine import Engine
from ..generation.prefill import encode_frames
from ..generation.sampling import SamplingParams
from ..generation.sequence import Request
from ..generation.stopping import STOP
from .data import ImageError
from .inputs import Built, InputBuilder
from .task import Prompt, Sample


@dataclass
class Job:
    sample: Sample
    prompt: Prompt
    max_new_tokens: int


OnDone = Callable[[Job, "str | None", "str | None"], None]


@dataclass
class _Live:
    job: Job
    key: tuple[str, ...] = ()  # the frames' digests: questions about the same image share a prompt prefix
    tokens: list[int] = field(default_factory=list)


class EngineBackend:
    """Generation with the local model. `batch`: sequences in flight at once (the engine's max_batch)."""

    kind = "engine"

    def __init__(self, model: Any, processor: Any, batch: int = 16, max_seq_len: int | None = None,
                 encode_ahead: bool | None = None) -> None:
        if batch < 1:
            raise ValueError(f"--batch must be >= 1, got {batch}")
        self.model = model
        self.processor = processor
        self.builder = InputBuilder(processor)
        self.tokens_generated = 0  # over the backend's life, stop tokens included
        cache = getattr(model, "encoder_cache", None)
        self.encoder_cache = cache if cache is not None else EncoderCache()
        self.engine = Engine(model, max_batch=batch, max_seq_len=max_seq_len, encoder_cache=self.encoder_cache)
        # the worker thread encodes new images (see the module docstring); None: on a CPU model with cores idle
        self.encode_ahead = encode_ahead if encode_ahead is not None else \
            model.device.type == "cpu" and torch.get_num_threads() < usable_cores()

    def _prepare(self, job: Job) -> tuple[Job, Built | None, str | None]:
        try:
            built = self.builder.build(job.prompt, job.sample.images)
        except ImageError as err:
            return job, None, f"image: {err}"
        except (ValueError, TypeError) as err:
            return job, None, f"prompt: {err}"
        if self.encode_ahead:
            self._encode(built)
        return job, built, None

    def _encode(self, built: Built) -> None:
        """The image features of a prepared job into the encoder cache, unless all are there already. A failure
        is left to the engine, which reports it for this sample."""
        if built.pixel_values is None or not built.frame_keys:
            return
        version = EncoderCache.weights_version(self.model)
        keys = [(version, key) for key in built.frame_keys]
        if all(key in self.encoder_cache for key in keys):
            return
        try:
            with torch.inference_mode():
                features = encode_frames(self.model, built.pixel_values, built.pixel_attention_mask)  # [N, S, D]
        except (ValueError, RuntimeError):
            return
        for key, feature in zip(keys, features):
            self.encoder_cache.put(key, feature.clone())  # its own storage, as the engine stores features

    def answer(self, jobs: Iterable[Job], on_done: OnDone) -> None:
        engine = self.engine
        queue_depth = 2 * engine.max_batch
        source: Iterator[Job] = iter(jobs)
        pending: deque[Future] = deque()
        held: deque[tuple[Job, Built]] = deque()  # waiting for a question about the same image to prefill
        live: dict[int, _Live] = {}
        prefilling: dict[tuple[str, ...], int] = {}  # image key -> sequences of it with no token yet
        pool = ThreadPoolExecutor(1, thread_name_prefix="idefics3-eval-inputs")

        def refill() -> None:
            while len(pending) < queue_depth:
                job = next(source, None)
                if job is None:
                    return
                pending.append(pool.submit(self._prepare, job))

        def add(job: Job, built: Built) -> None:
            error = self._add(job, built, live)
            if error is not None:
                on_done(job, None, error)
            elif built.frame_keys:
                key = tuple(built.frame_keys)
                prefilling[key] = prefilling.get(key, 0) + 1

        def release_held() -> None:
            keep: deque[tuple[Job, Built]] = deque()
            for job, built in held:
                if prefilling.get(tuple(built.frame_keys or ())):
                    keep.append((job, built))
                else:
                    add(job, built)
            held.clear()
            held.extend(keep)

        try:
            refill()
            while pending or held or engine.has_work():
                release_held()
                while pending and len(live) + len(held) < queue_depth:  # in order: the same batches every run
                    job, built, error = pending.popleft().result()
                    refill()
                    if error is not None:
                        on_done(job, None, error)
                    elif built.frame_keys and prefilling.get(tuple(built.frame_keys)):
                        held.append((job, built))  # reuse that question's prefix once it is in the cache
                    else:
                        add(job, built)
                if engine.has_work():
                    for event in engine.step():
                        entry = live[event.seq_id]
                        if not entry.tokens and entry.key:
                            prefilling[entry.key] -= 1
                        entry.tokens.append(event.token_id)
                        self.tokens_generated += 1
                        if event.finish_reason is not None:
                            del live[event.seq_id]
                            on_done(entry.job, self._decode(entry.tokens, event.finish_reason), None)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for seq_id in list(live):  # interrupted: free the slots of what was in flight
                engine.abort(seq_id)

    def _add(self, job: Job, built: Built, live: dict[int, _Live]) -> str | None:
        params = SamplingParams(temperature=0.0, max_new_tokens=job.max_new_tokens)
        request = Request(built.ids, params, pixel_values=_to(built.pixel_values, self.model),
                          pixel_attention_mask=_to(built.pixel_attention_mask, self.model),
                          frame_keys=built.frame_keys)
        try:
            seq_id = self.engine.add(request)
        except ValueError as err:
            return f"prompt: {err}"
        live[seq_id] = _Live(job, key=tuple(built.frame_keys or ()))
        return None

    def _decode(self, tokens: list[int], reason: str) -> str:
        if reason == STOP and tokens:
            tokens = tokens[:-1]  # the stop token itself
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _to(tensor: torch.Tensor | None, model: Any) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.to(model.device)
