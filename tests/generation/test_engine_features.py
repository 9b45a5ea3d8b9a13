"""What a server needs from the engine: chunked prefill, prefix caching with image-aware keys, log-probabilities,
OpenAI's presence/frequency penalties and token constraints. Each is checked against the plain path it must
equal, or against a hand computation."""

from __future__ import annotations

import pytest
import torch

from idefics3 import Engine, SamplingParams
from idefics3.generation.engine import Request

NEW = 8


@pytest.fixture(scope="module")
def prompts(processor, images, chat_prompt):
    """(ids, pixels, mask) for: text only, one image, two images."""
    out = []
    for text, imgs in [("Tell me a story.", []), ("What is this?", [images[1]]),
                       ("Compare them.", [images[1], images[2]])]:
        inputs = processor(text=chat_prompt(text, len(imgs)), images=imgs or None, return_tensors="pt")
        out.append((inputs["input_ids"][0].tolist(), inputs["pixel_values"][0] if imgs else None,
                    inputs["pixel_attention_mask"][0] if imgs else None))
    return out


def req(prompt, pv=None, pm=None, new=NEW, **params):
    return Request(list(prompt), SamplingParams(max_new_tokens=new, **params), pixel_values=pv,
                   pixel_attention_mask=pm)


def drain(engine, reqs, add_at=None, log=None):
    """Run to completion; returns each request's tokens and, per request, the events."""
    add_at = add_at or [0] * len(reqs)
    ids, events = {}, {}
    step = 0
    while len(ids) < len(reqs) or engine.has_work():
        for i, r in enumerate(reqs):
            if add_at[i] == step:
                ids[engine.add(r)] = i
        got = engine.step()
        if log is not None:
            log.append({ids[e.seq_id] for e in got})
        for e in got:
            events.setdefault(ids[e.seq_id], []).append(e)
        step += 1
    return [[e.token_id for e in events[i]] for i in range(len(reqs))], [events[i] for i in range(len(reqs))]


def solo(model, r):
    return drain(Engine(model, max_batch=1, max_seq_len=512, prefix_cache=False), [r])[0][0]


def test_chunked_prefill_equals_whole_and_keeps_streams_going(model, prompts):
    """A text stream decodes while a two-image prompt is prefilled in chunks of 16 tokens (frames one by one):
    the stream gets a token every step, and both answers equal their solo runs."""
    text, image = req(*prompts[0], new=40), req(*prompts[2])
    engine = Engine(model, max_batch=2, max_seq_len=512, max_prefill_chunk=16)
    log = []
    got, _ = drain(engine, [text, image], add_at=[0, 2], log=log)
    assert got == [solo(model, req(*prompts[0], new=40)), solo(model, req(*prompts[2]))]
    first_image_step = next(i for i, s in enumerate(log) if 1 in s)
    assert first_image_step - 2 >= len(prompts[2][0]) // 16  # the prefill took several steps...
    assert all(0 in s for s in log[1:first_image_step + 1])  # ...and the stream got a token in every one


def test_prefix_cache_second_turn_reuses_the_first(model, prompts, processor, chat_prompt, images):
    """Turn two resends turn one (image included) plus the answer: only the new tokens are prefilled, and the
    answer equals the one computed without the cache."""
    first = req(*prompts[1])
    engine = Engine(model, max_batch=1, max_seq_len=512)
    (answer,), (events,) = drain(engine, [first])
    assert events[0].cached_tokens == 0
    follow = prompts[1][0] + answer + processor.tokenizer("\nUser: and now?", add_special_tokens=False)["input_ids"]
    second = req(follow, prompts[1][1], prompts[1][2])
    (got,), (events,) = drain(engine, [second])
    reused = events[0].cached_tokens
    assert reused == len(prompts[1][0]) + len(answer) - 1  # all but the answer's last token, never written
    assert got == solo(model, req(follow, prompts[1][1], prompts[1][2]))
    assert engine.slots.stats.hits == 1 and engine.slots.stats.reused_tokens == reused


def test_same_text_other_image_shares_nothing_past_the_image(model, prompts):
    """The bug class of vLLM/LMCache: the same tokens with a different picture must not reuse keys/values."""
    ids, pv, pm = prompts[1]
    other = pv.clone()
    other[-1, :, :4, :4] += 0.5  # one corner of the last frame
    engine = Engine(model, max_batch=1, max_seq_len=512)
    drain(engine, [req(ids, pv, pm)])
    (got,), (events,) = drain(engine, [req(ids, other, pm)])
    s = model.config.image_seq_len
    first_image = ids.index(model.config.image_token_id)
    last_frame_start = [i for i, t in enumerate(ids) if t == model.config.image_token_id][-s]
    assert first_image < events[0].cached_tokens <= last_frame_start  # the frames before the changed one only
    assert got == solo(model, req(ids, other, pm))


def test_running_sequence_prefix_is_copied(model, prompts):
    """A second question about the same image while the first still runs copies the shared prefix."""
    ids, pv, pm = prompts[1]
    other = ids[:-3] + [ids[-1]]  # the same image, a shorter question
    engine = Engine(model, max_batch=2, max_seq_len=512)
    got, events = drain(engine, [req(ids, pv, pm, new=20), req(other, pv, pm)], add_at=[0, 3])
    assert events[1][0].cached_tokens >= len(other) - 4
    assert got[1] == solo(model, req(other, pv, pm))


def test_prefix_cache_off_and_bounded(model, prompts):
    engine = Engine(model, max_batch=1, max_seq_len=512, prefix_cache=False)
    drain(engine, [req(*prompts[1])])
    _, (events,) = drain(engine, [req(*prompts[1])])
    assert events[0].cached_tokens == 0
    engine = Engine(model, max_batch=1, max_seq_len=512, prefix_cache_slots=1)
    assert engine.cache.max_batch == 2  # the memory is the slots, allocated once
    drain(engine, [req(*prompts[1]), req(*prompts[0]), req(*prompts[1])])  # the image prompt survives one other
    assert engine.slots.stats.hits == 1


def test_logprobs_are_the_models(model, prompts):
    ids = prompts[0][0]
    _, (events,) = drain(Engine(model, max_batch=1, max_seq_len=512), [req(ids, new=3, logprobs=4)])
    tokens = [e.token_id for e in events]
    with torch.inference_mode():
        logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()  # [3, V]
    lp = torch.log_softmax(logits, dim=-1)
    for e, row in zip(events, lp):
        assert e.logprob == pytest.approx(row[e.token_id].item(), abs=1e-4)
        top = row.topk(4)
        assert [i for i, _ in e.top_logprobs] == top.indices.tolist()
        assert [v for _, v in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    _, (plain,) = drain(Engine(model, max_batch=1, max_seq_len=512), [req(ids, new=3)])
    assert plain[0].logprob is None and plain[0].top_logprobs is None


def test_presence_and_frequency_penalties(model, prompts):
    """Greedy with penalties equals a hand loop over the full forward that subtracts them."""
    ids = prompts[0][0]
    pres, freq = 1.5, 0.7
    (got,), _ = drain(Engine(model, max_batch=2, max_seq_len=512),
                      [req(ids, new=10, presence_penalty=pres, frequency_penalty=freq)])
    seq, counts = list(ids), torch.zeros(model.config.text_config.vocab_size)
    with torch.inference_mode():
        for _ in range(10):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            logits = logits - freq * counts - pres * (counts > 0).float()
            t = int(logits.argmax())
            counts[t] += 1
            seq.append(t)
    assert got == seq[len(ids):]
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3.0)


class OnlyTokens:
    """A constraint that allows a fixed set of tokens, then only one stop id."""

    def __init__(self, allowed: list[int], stop_id: int, length: int, vocab: int) -> None:
        self.mask = torch.zeros(vocab, dtype=torch.bool)
        self.mask[allowed] = True
        self.stop = torch.zeros(vocab - 7, dtype=torch.bool)  # shorter than the vocab: the rest is disallowed
        self.stop[stop_id] = True
        self.length, self.seen = length, []

    def allowed(self):
        return self.stop if len(self.seen) >= self.length else self.mask

    def accept(self, token_id):
        self.seen.append(token_id)


def test_constraint_masks_every_token(model, prompts):
    vocab = model.config.text_config.vocab_size
    eos = 2
    c = OnlyTokens([5, 9, 17], eos, 4, vocab)
    r = req(prompts[0][0], new=20, temperature=1.0, seed=3, stop_token_ids=(eos,))
    r.constraint = c
    (got,), (events,) = drain(Engine(model, max_batch=1, max_seq_len=512), [r])
    assert set(got[:4]) <= {5, 9, 17} and got[4:] == [eos] and events[-1].finish_reason == "stop"
    assert c.seen == got
