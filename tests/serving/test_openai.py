"""The server through the real `openai` client: greedy answers equal `model.generate` token for token (chat with
images, text completions, streaming or not), and every sampling field does what OpenAI documents."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from live_server import call, image_part, picture

openai = pytest.importorskip("openai")

NEW = 12


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.v1, api_key="-", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """model.generate on the same checkpoint: the tokens every greedy answer must equal."""
    from idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor

    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    processor = Idefics3Processor.from_pretrained(tiny_checkpoint)

    def answer(content: list[dict] | str, images=(), new: int = NEW, split: bool = True) -> tuple[list[int], str]:
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        kwargs = {} if split else {"do_image_splitting": False}
        inputs = processor(text=prompt, images=list(images) or None, return_tensors="pt", **kwargs)
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False)
        new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        return new_ids, processor.tokenizer.decode(new_ids, skip_special_tokens=True).lstrip()

    answer.processor = processor
    answer.model = model
    return answer


def chat(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", NEW), **kw)


@pytest.fixture(scope="module", autouse=True)
def model_name(live):
    live.state.model_name = "tiny"


def test_models_lists_the_served_name(client, live):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.owned_by == "idefics3"


def test_chat_with_images_equals_generate(client, reference):
    images = [picture(1), picture(2, 64, 30)]
    content = [image_part(images[0]), {"type": "text", "text": "Compare"}, image_part(images[1]),
               {"type": "text", "text": "these two."}]
    ids, text = reference([{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"},
                              {"type": "text", "text": "these two."}], images)
    r = chat(client, content)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == len(_until_stop(ids, reference))
    assert r.choices[0].finish_reason == ("length" if len(_until_stop(ids, reference)) == NEW else "stop")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"


def _until_stop(ids, reference):
    from idefics3.generation.config import GenerationConfig

    eos = set(GenerationConfig.for_model(reference.model).eos_token_id)
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def test_detail_low_is_one_frame_without_tiling(client, reference):
    image = picture(3, 60, 64)
    _, text = reference([{"type": "image"}, {"type": "text", "text": "What?"}], [image], split=False)
    r = chat(client, [image_part(image, "low"), {"type": "text", "text": "What?"}])
    assert r.choices[0].message.content == text
    full = chat(client, [image_part(image, "high"), {"type": "text", "text": "What?"}])
    assert full.usage.prompt_tokens > r.usage.prompt_tokens  # tiles + the global frame


def test_streaming_equals_non_streaming_and_ends_with_usage(client, reference):
    content = [image_part(picture(4)), {"type": "text", "text": "Describe it."}]
    whole = chat(client, content)
    chunks = list(chat(client, content, stream=True, stream_options={"include_usage": True}))
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format(live):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 3,
            "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_text_completion_equals_generate(client, reference):
    processor, model = reference.processor, reference.model
    prompt = "The picture shows"
    inputs = processor(text=prompt, return_tensors="pt")
    out = model.generate(input_ids=inputs["input_ids"], max_new_tokens=NEW, do_sample=False)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0)
    assert r.choices[0].text == expected and r.object == "text_completion"
    two = client.completions.create(model="tiny", prompt=[prompt, "Once upon"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == \
        processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:][:4].tolist(), skip_special_tokens=True)


def test_n_choices_share_one_prompt(client):
    content = [image_part(picture(5)), {"type": "text", "text": "Say something."}]
    greedy = chat(client, content, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1  # greedy: all the same
    assert greedy.usage.completion_tokens == 3 * chat(client, content).usage.completion_tokens
    sampled = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                             n=4, temperature=1.5, seed=7, max_tokens=NEW)
    assert len({c.message.content for c in sampled.choices}) > 1  # n draws, not n copies


def test_seed_reproduces_and_differs(client):
    ask = lambda seed: client.chat.completions.create(  # noqa: E731
        model="tiny", messages=[{"role": "user", "content": "Tell me"}], temperature=1.3, top_p=0.95, seed=seed,
        max_tokens=NEW, extra_body={"top_k": 50, "min_p": 0.01}).choices[0].message.content  # vLLM's extras
    assert ask(3) == ask(3)
    assert len({ask(s) for s in range(4)}) > 1


def test_stop_strings_cut_before_the_stop(client):
    base = chat(client, "Tell me a long story", max_tokens=30).choices[0].message.content
    words = [w for w in base.split() if len(w) >= 2]
    if not words:
        pytest.skip("the tiny model's answer has no word to stop at")
    stop = words[min(2, len(words) - 1)]
    r = chat(client, "Tell me a long story", max_tokens=30, stop=[stop, "zzzz-never"])
    assert r.choices[0].message.content == base[:base.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       chat(client, "Tell me a long story", max_tokens=30, stop=stop, stream=True) if c.choices)
    assert streamed == base[:base.index(stop)]


def test_logprobs_are_the_models(client, reference):
    r = chat(client, "Hello", max_tokens=4, logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens and all(len(i.top_logprobs) == 3 for i in items)
    processor, model = reference.processor, reference.model
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
                                           add_generation_prompt=True)
    ids = processor(text=prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        lp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
    top = lp.topk(3)
    assert items[0].logprob == pytest.approx(top.values[0].item(), abs=1e-3)
    assert [t.logprob for t in items[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert items[0].top_logprobs[0].token == processor.tokenizer.decode([int(top.indices[0])])
    streamed = [c for c in chat(client, "Hello", max_tokens=4, logprobs=True, top_logprobs=1, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [c.choices[0].logprobs.content[0].logprob for c in streamed] == \
        pytest.approx([i.logprob for i in items], abs=1e-4)


def test_penalties_change_the_answer_and_stay_greedy(client):
    plain = chat(client, "Repeat repeat repeat", max_tokens=20).choices[0].message.content
    again = chat(client, "Repeat repeat repeat", max_tokens=20, frequency_penalty=2.0, presence_penalty=2.0)
    assert again.choices[0].message.content == chat(client, "Repeat repeat repeat", max_tokens=20,
                                                     frequency_penalty=2.0, presence_penalty=2.0
                                                     ).choices[0].message.content
    assert again.choices[0].message.content != plain or len(plain) < 4


def test_json_schema_output_parses_and_validates(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": [image_part(picture(seed)),
                                                                 {"type": "text", "text": "Describe as JSON"}]}],
            response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}},
            temperature=1.0, seed=seed, max_tokens=60)
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"colour", "count"} and value["colour"] in ("red", "green", "blue")
        assert isinstance(value["count"], int) and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_async_client_concurrent_requests(live):
    async def main():
        client = openai.AsyncOpenAI(base_url=live.v1, api_key="-", max_retries=0)
        calls = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Hi {i}"}],
                                                temperature=0, max_tokens=6) for i in range(6)]
        return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    sync = openai.OpenAI(base_url=live.v1, api_key="-")
    for i, a in enumerate(answers):
        assert a.choices[0].message.content == chat(sync, f"Hi {i}", max_tokens=6).choices[0].message.content


def test_multi_turn_reuses_the_prefix(client, live):
    image = picture(9, 64, 64)
    first = [{"role": "user", "content": [image_part(image), {"type": "text", "text": "What is it?"}]}]
    r1 = client.chat.completions.create(model="tiny", messages=first, temperature=0, max_tokens=8)
    turn2 = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And the colour?"}]
    r2 = client.chat.completions.create(model="tiny", messages=turn2, temperature=0, max_tokens=8)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens - 1  # the first turn's image and question at least
    live.state.runner.engine.slots.enabled = False
    try:
        cold = client.chat.completions.create(model="tiny", messages=turn2, temperature=0, max_tokens=8)
    finally:
        live.state.runner.engine.slots.enabled = True
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == r2.choices[0].message.content
    status, _, text = call(live, "GET", "/metrics")
    assert status == 200 and "idefics3_prefix_cache_hit_rate" in text


def test_tokenize_and_detokenize(live, reference):
    status, _, out = call(live, "POST", "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and out["tokens"] == reference.processor.tokenizer("Hello world")["input_ids"]
    status, _, back = call(live, "POST", "/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and back["prompt"].endswith("Hello world")
    status, _, chat_ids = call(live, "POST", "/tokenize", {"messages": [
        {"role": "user", "content": [image_part(picture(1)), {"type": "text", "text": "Hi"}]}]})
    assert status == 200 and reference.processor.image_token_id in chat_ids["tokens"]
