"""`/v1/chat/completions` and `/v1/completions`: a validated request -> engine requests -> OpenAI responses.

One request becomes one group of engine sequences: its n choices (sharing one prefill, engine.py), or for a
text completion with a list of prompts, n per prompt. The group goes to the engine thread through the runner;
tokens come back on an asyncio queue and are turned into text per choice (text.py), streamed as server-sent
events (`data: {chunk}` ... `data: [DONE]`) or gathered into one response. A client that disconnects aborts
its group (the slot is free within one engine step); so does a non-streaming client that goes away, checked
every half second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..generation.sampling import SamplingParams
from ..generation.sequence import Request, TokenEvent
from ..generation.stopping import StopStrings
from .errors import ApiError
from .grammar import GrammarError
from .media import MediaError
from .prompts import Prompt, PromptError
from .protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
)
from .runner import Draining, QueueFull, Sink
from .text import ChoiceText

logger = logging.getLogger("idefics3.serving")
MAX_STOP_STRINGS = 16
DISCONNECT_POLL = 0.5


@dataclass
class Group:
    """One HTTP request's sequences in flight."""

    id: str
    endpoint: str
    sink: Sink
    texts: list[ChoiceText]
    prompt_tokens: int
    started: float
    cached_tokens: int = 0
    first_token: float | None = None


# ---- building the engine requests ---------------------------------------------------------------------
async def prepare(build: Any, *args: Any) -> Prompt:
    """Run the prompt builder on a worker thread; its refusals become 400s naming the field."""
    try:
        return await asyncio.to_thread(build, *args)
    except PromptError as err:
        raise ApiError(400, str(err), err.param, err.code) from err
    except MediaError as err:
        raise ApiError(400, str(err), "messages", "invalid_image") from err


def sampling(state: Any, body: ChatCompletionRequest | CompletionRequest, prompt_len: int,
             max_tokens: int | None, logprobs: int | None, max_tokens_field: str = "max_tokens"
             ) -> list[SamplingParams]:
    """One SamplingParams per choice; checks what pydantic cannot (the context length)."""
    room = state.max_model_len - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens, which fills this server's context of "
                            f"{state.max_model_len} tokens", "messages", "context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"{max_tokens_field} is {max_tokens}, but the prompt has {prompt_len} tokens and the "
                            f"context is {state.max_model_len}: at most {room} new tokens fit", max_tokens_field,
                       "context_length_exceeded")
    temperature = 1.0 if body.temperature is None else body.temperature
    out = []
    for j in range(body.n):
        out.append(SamplingParams(
            temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            seed=None if body.seed is None else body.seed + j, max_new_tokens=max_tokens or room,
            logprobs=logprobs))
    return out


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")
    return stops


def engine_requests(state: Any, prompt: Prompt, params: list[SamplingParams], stops: list[str],
                    response_format: dict | None = None) -> list[Request]:
    stop = StopStrings(stops, state.processor.tokenizer) if stops else None
    requests = []
    for p in params:
        constraint = None
        if response_format is not None and response_format.get("type") != "text":
            if state.grammars is None:
                raise ApiError(400, "response_format needs the checkpoint's tokenizer.json, which this model lacks",
                               "response_format")
            try:
                constraint = state.grammars.constraint(response_format)
            except GrammarError as err:
                raise ApiError(400, str(err), "response_format", "invalid_response_format") from err
        requests.append(Request(prompt.ids, p, pixel_values=prompt.pixel_values,
                                pixel_attention_mask=prompt.pixel_attention_mask, stop=stop, constraint=constraint,
                                frame_keys=prompt.frame_keys))
    return requests


def submit(state: Any, requests: list[Request], endpoint: str, prefix: str, stops: list[str],
           strip_leading: bool) -> Group:
    sink = Sink(asyncio.get_running_loop())
    try:
        state.runner.submit(requests, sink)
    except QueueFull as err:
        raise ApiError(429, f"the server is busy ({err}); retry shortly", None, "queue_full",
                       {"Retry-After": "1"}) from err
    except Draining as err:
        raise ApiError(503, "the server is shutting down", None, "draining") from err
    texts = [ChoiceText(state.processor.tokenizer, stops, strip_leading) for _ in requests]
    return Group(f"{prefix}-{uuid.uuid4().hex}", endpoint, sink, texts, len(requests[0].prompt_ids),
                 time.perf_counter())


# ---- consuming events ---------------------------------------------------------------------------------
async def events(group: Group, http: HttpRequest | None = None) -> AsyncIterator[tuple[int, TokenEvent, str]]:
    """(choice index, event, new text) until every choice has finished; an engine error raises."""
    open_choices = len(group.texts)
    while open_choices:
        if http is None:
            item = await group.sink.queue.get()
        else:
            try:
                item = await asyncio.wait_for(group.sink.queue.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
        if item[0] == "error":
            err = item[1]
            status = 400 if isinstance(err, ValueError) else 500
            raise ApiError(status, str(err), None, "engine_error")
        _, index, event = item
        if group.first_token is None:
            group.first_token = time.perf_counter()
        if event.cached_tokens is not None and index == 0:
            group.cached_tokens = event.cached_tokens
        text = group.texts[index]
        if text.finish_reason is not None:  # already cut at a stop string: the engine's end adds no text
            if event.finish_reason is None:
                continue
            piece = ""
        else:
            piece = text.push(event)
        if event.finish_reason is not None:
            open_choices -= 1
        yield index, event, piece


def usage(group: Group) -> Usage:
    completion = sum(t.tokens for t in group.texts)
    return Usage(prompt_tokens=group.prompt_tokens, completion_tokens=completion,
                 total_tokens=group.prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=group.cached_tokens))


def finish(state: Any, group: Group, outcome: str) -> None:
    state.runner.metrics.requests.labels(group.endpoint, outcome).inc()
    now = time.perf_counter()
    ttft = f"{group.first_token - group.started:.3f}s" if group.first_token else "-"
    logger.info("%s %s: %s, prompt %d tokens (%d cached), generated %d, ttft %s, total %.3fs", group.id,
                group.endpoint, outcome, group.prompt_tokens, group.cached_tokens,
                sum(t.tokens for t in group.texts), ttft, now - group.started)


async def respond(state: Any, group: Group, stream: bool, include_usage: bool, http: HttpRequest,
                  chunk: Any, final: Any) -> Any:
    """Stream SSE chunks (`chunk(index, event, piece, text)` -> dict) or return `final()` when done."""
    if not stream:
        outcome = "error"
        try:
            async for _ in events(group, http):
                pass
            outcome = "ok"
            return JSONResponse(final().model_dump(exclude_none=True))
        except asyncio.CancelledError:
            outcome = "aborted"
            raise
        finally:
            if outcome != "ok":
                state.runner.abort(group.sink)
            finish(state, group, outcome)

    async def sse() -> AsyncIterator[str]:
        outcome = "aborted"
        try:
            async for index, event, piece in events(group):
                body = chunk(index, event, piece, group.texts[index])
                if body is not None:
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
            if include_usage:
                yield "data: " + json.dumps({**chunk(None, None, None, None), "choices": [],
                                             "usage": usage(group).model_dump(exclude_none=True)}) + "\n\n"
            outcome = "ok"
        except ApiError as err:
            outcome = "error"
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            if outcome != "ok":
                state.runner.abort(group.sink)
            finish(state, group, outcome)
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the two endpoints --------------------------------------------------------------------------------
async def chat_completion(state: Any, body: ChatCompletionRequest, http: HttpRequest) -> Any:
    state.check_model(body.model)
    prompt = await prepare(state.builder.chat, body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = body.top_logprobs if body.top_logprobs is not None else 0
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    params = sampling(state, body, len(prompt.ids), max_tokens, top if body.logprobs else None, field)
    stops = stop_strings(body.stop)
    fmt = body.response_format.model_dump(by_alias=True, exclude_none=True) if body.response_format else None
    requests = engine_requests(state, prompt, params, stops, fmt)
    group = submit(state, requests, "chat", "chatcmpl", stops, strip_leading=True)
    created = int(time.time())
    base = {"id": group.id, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    started: set[int] = set()

    def chunk(index: int | None, event: TokenEvent | None, piece: str | None, text: ChoiceText | None) -> Any:
        if index is None:
            return base
        delta: dict[str, Any] = {}
        if index not in started:
            started.add(index)
            delta["role"] = "assistant"
        if piece:
            delta["content"] = piece
        done = event.finish_reason is not None
        if not delta and not done and event.logprob is None:
            return None
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": text.finish_reason if done
                                  else None}
        if event.logprob is not None:
            choice["logprobs"] = {"content": [text.logprobs[-1].model_dump()]}
        return {**base, "choices": [choice]}

    def final() -> ChatCompletion:
        choices = [ChatChoice(index=i, message=ResponseMessage(content=t.text), finish_reason=t.finish_reason,
                              logprobs=ChoiceLogprobs(content=t.logprobs) if body.logprobs else None)
                   for i, t in enumerate(group.texts)]
        return ChatCompletion(id=group.id, created=created, model=state.model_name, choices=choices,
                              usage=usage(group))

    include = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(state, group, body.stream, include, http, chunk, final)


async def completion(state: Any, body: CompletionRequest, http: HttpRequest) -> Any:
    state.check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise ApiError(400, "prompt must not be an empty list", "prompt")
    if len(prompts) > 16:
        raise ApiError(400, f"at most 16 prompts per request, got {len(prompts)}", "prompt")
    built = [await prepare(state.builder.text, p) for p in prompts]
    stops = stop_strings(body.stop)
    requests = []
    for prompt in built:
        params = sampling(state, body, len(prompt.ids), body.max_tokens, body.logprobs)
        requests += engine_requests(state, prompt, params, stops)
    group = submit(state, requests, "completions", "cmpl", stops, strip_leading=False)
    group.prompt_tokens = sum(len(p.ids) for p in built)
    created = int(time.time())
    base = {"id": group.id, "object": "text_completion", "created": created, "model": state.model_name}

    def logprobs_of(text: ChoiceText, items: list) -> CompletionLogprobs:
        offsets, at = [], len(text.text) - sum(len(t.token) for t in items)
        for t in items:
            offsets.append(max(at, 0))
            at += len(t.token)
        return CompletionLogprobs(tokens=[t.token for t in items], token_logprobs=[t.logprob for t in items],
                                  top_logprobs=[{a.token: a.logprob for a in t.top_logprobs} for t in items],
                                  text_offset=offsets)

    def chunk(index: int | None, event: TokenEvent | None, piece: str | None, text: ChoiceText | None) -> Any:
        if index is None:
            return base
        done = event.finish_reason is not None
        if not piece and not done:
            return None
        choice: dict[str, Any] = {"index": index, "text": piece or "", "finish_reason": text.finish_reason
                                  if done else None}
        if event.logprob is not None:
            choice["logprobs"] = logprobs_of(text, text.logprobs[-1:]).model_dump()
        return {**base, "choices": [choice]}

    def final() -> Completion:
        choices = [CompletionChoice(index=i, text=t.text, finish_reason=t.finish_reason,
                                    logprobs=logprobs_of(t, t.logprobs) if body.logprobs is not None else None)
                   for i, t in enumerate(group.texts)]
        return Completion(id=group.id, created=created, model=state.model_name, choices=choices, usage=usage(group))

    include = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(state, group, body.stream, include, http, chunk, final)
