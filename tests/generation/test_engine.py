"""The Engine: sequences admitted at different times, in reused slots, give what they give alone."""

from __future__ import annotations

import pytest
import torch

from idefics3 import Engine, SamplingParams
from idefics3.generation import engine as engine_module
from idefics3.generation.engine import Request

NEW = 8


@pytest.fixture(scope="module")
def requests(processor, images, chat_prompt):
    """Four prompts with 0, 1, 2 and 1 images (frames without the processor's batch padding)."""
    specs = [("Hello there, who are you?", []), ("What is this?", [images[0]]),
             ("Compare these two pictures in detail.", [images[1], images[2]]), ("And this one?", [images[2]])]
    out = []
    for text, imgs in specs:
        inputs = processor(text=chat_prompt(text, len(imgs)), images=imgs or None, return_tensors="pt")
        pv = inputs["pixel_values"][0] if imgs else None
        pm = inputs["pixel_attention_mask"][0] if imgs else None
        out.append((inputs["input_ids"][0].tolist(), pv, pm))
    return out


def run(engine, reqs, add_at=None):
    """Step the engine to completion; request i is added before step add_at[i]. Returns ids and reasons."""
    add_at = add_at or [0] * len(reqs)
    ids, tokens, reasons = {}, {}, {}
    step = 0
    while len(ids) < len(reqs) or engine.has_work():
        for i, r in enumerate(reqs):
            if add_at[i] == step:
                ids[engine.add(r)] = i
        for ev in engine.step():
            tokens.setdefault(ids[ev.seq_id], []).append(ev.token_id)
            if ev.finish_reason:
                reasons[ids[ev.seq_id]] = ev.finish_reason
        step += 1
    return [tokens[i] for i in range(len(reqs))], [reasons[i] for i in range(len(reqs))]


def make(prompt, pv, pm, **params):
    return Request(prompt, SamplingParams(max_new_tokens=NEW, **params), pixel_values=pv, pixel_attention_mask=pm)


def alone(model, req):
    return run(Engine(model, max_batch=1, max_seq_len=256), [req])[0][0]


def count_prefill_rows(monkeypatch) -> list[int]:
    """The number of rows of every prefill forward the engine runs from now on."""
    counts: list[int] = []
    original = engine_module.run_rows
    monkeypatch.setattr(engine_module, "run_rows", lambda model, cache, rows, pad: counts.append(len(rows))
                        or original(model, cache, rows, pad))
    return counts


def test_staggered_admission_and_slot_reuse(model, requests):
    """Two slots, four sequences arriving at different steps: each equals its solo run."""
    solo = [alone(model, make(*r)) for r in requests]
    engine = Engine(model, max_batch=2, max_seq_len=256)
    got, reasons = run(engine, [make(*r) for r in requests], add_at=[0, 3, 3, 5])
    assert got == solo
    assert reasons == ["length"] * 4
    assert sorted(engine.free_slots) == [0, 1] and not engine.running


def test_solo_engine_equals_generate(model, requests):
    prompt, pv, pm = requests[2]
    out = model.generate(input_ids=torch.tensor([prompt]), pixel_values=pv[None], pixel_attention_mask=pm[None],
                         max_new_tokens=NEW)
    assert out[0, len(prompt):].tolist() == alone(model, make(*requests[2]))


def test_mixed_sampling_settings_in_one_batch(model, requests):
    """Greedy rows stay greedy next to sampled ones; a seeded row draws what it draws alone."""
    hot = dict(temperature=1.5, top_k=0, seed=11)
    reqs = [make(*requests[0]), make(*requests[1], **hot), make(*requests[2], temperature=0.8, top_p=0.9),
            make(*requests[3], repetition_penalty=1.4)]
    got, _ = run(Engine(model, max_batch=4, max_seq_len=256), reqs)
    assert got[0] == alone(model, make(*requests[0]))
    assert got[1] == alone(model, make(*requests[1], **hot))
    assert got[3] == alone(model, make(*requests[3], repetition_penalty=1.4))


def test_repetition_penalty_table_is_reset_when_a_slot_is_reused(model, requests):
    reqs = [make(*requests[0], repetition_penalty=2.0), make(*requests[1], repetition_penalty=2.0)]
    got, _ = run(Engine(model, max_batch=1, max_seq_len=256), reqs)
    assert got[1] == alone(model, reqs[1])


def test_stop_ids_and_min_new_tokens(model, requests):
    free = alone(model, make(*requests[0]))
    stop = free[2]
    got, reasons = run(Engine(model, max_batch=1, max_seq_len=256), [make(*requests[0], stop_token_ids=(stop,))])
    assert got[0] == free[:free.index(stop) + 1] and reasons == ["stop"]
    got, _ = run(Engine(model, max_batch=1, max_seq_len=256),
                 [make(*requests[0], stop_token_ids=(stop,), min_new_tokens=NEW)])
    assert len(got[0]) == NEW and stop not in got[0]


def test_cache_end_finishes_with_length(model, requests):
    prompt = requests[0][0]
    engine = Engine(model, max_batch=1, max_seq_len=len(prompt) + 3)
    got, reasons = run(engine, [make(prompt, None, None)])
    assert len(got[0]) == 3 and reasons == ["length"]
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(model, max_batch=1, max_seq_len=len(prompt)).add(make(prompt, None, None))


def test_abort_frees_the_slot(model, requests):
    engine = Engine(model, max_batch=1, max_seq_len=256)
    a = engine.add(make(*requests[0]))
    b = engine.add(make(*requests[1]))
    engine.step()
    assert engine.abort(a) and engine.free_slots == [0]
    assert engine.abort(12345) is False
    events = engine.step()
    assert [e.seq_id for e in events] == [b]


def test_image_token_mismatch_is_rejected_at_add(model, requests):
    prompt, pv, pm = requests[2]
    engine = Engine(model, max_batch=1, max_seq_len=256)
    with pytest.raises(ValueError, match="<image> tokens"):
        engine.add(Request(prompt, pixel_values=pv[:1], pixel_attention_mask=pm[:1]))
    with pytest.raises(ValueError, match="empty"):
        engine.add(Request([]))


def test_precomputed_image_features(model, requests):
    prompt, pv, pm = requests[1]
    feats = model.get_image_features(pv[None], pm[None])
    req = Request(prompt, SamplingParams(max_new_tokens=NEW), image_hidden_states=feats)
    assert run(Engine(model, max_batch=1, max_seq_len=256), [req])[0][0] == alone(model, make(*requests[1]))


def test_same_prompt_is_prefilled_once_and_read_from_one_slot(model, requests, monkeypatch):
    """Three sequences of one prompt and image (different settings) admitted together: one prefill row, each
    equals its solo run. The first finishes early and a new prompt takes its slot while the other two still
    decode; they then read the prompt from their own copies."""
    prompt, pv, pm = requests[1]
    reqs = [Request(prompt, SamplingParams(max_new_tokens=3), pixel_values=pv, pixel_attention_mask=pm),
            make(prompt, pv.clone(), pm),
            make(prompt, pv, pm, temperature=0.8, seed=5),
            make(*requests[3])]
    solo = [alone(model, r) for r in reqs]
    engine = Engine(model, max_batch=3, max_seq_len=256)
    prefilled, shared = count_prefill_rows(monkeypatch), []
    if engine.fast_decoder is not None:
        decoder = engine.fast_decoder
        engine.fast_decoder = lambda *a: shared.append(None if a[4] is None else a[4].tolist()) or decoder(*a)
    got, _ = run(engine, reqs, add_at=[0, 0, 0, 5])
    assert got == solo
    assert prefilled == [1, 1]  # the three copies in one row; the last prompt after the first one finished
    n = len(prompt)
    if engine.fast_decoder is not None:
        assert shared[:2] == [[[0, 0], [0, n], [0, n]]] * 2  # slot 0 holds the prompt for the other two
        assert shared[-1] is None  # after slot 0 was given to the new prompt
    slot1 = engine.cache.k[0][1, :, :n]
    assert torch.equal(slot1, engine.cache.k[0][2, :, :n])  # the copies of the prompt


def test_prompts_given_as_tensors_are_shared_too(model, requests, monkeypatch):
    prompt, pv, pm = requests[1]
    engine = Engine(model, max_batch=2, max_seq_len=256)
    prefilled = count_prefill_rows(monkeypatch)
    got, _ = run(engine, [make(torch.tensor(prompt), pv, pm), make(torch.tensor(prompt), pv, pm)])
    assert prefilled == [1]
    assert got == [alone(model, make(prompt, pv, pm))] * 2


def test_different_images_are_not_shared(model, requests, monkeypatch):
    prompt, pv, pm = requests[1]
    other = pv.clone()
    other[0, 0, 0, 0] += 1.0
    engine = Engine(model, max_batch=2, max_seq_len=256)
    prefilled = count_prefill_rows(monkeypatch)
    got, _ = run(engine, [make(prompt, pv, pm), make(prompt, other, pm)])
    assert prefilled == [2]
    assert got == [alone(model, make(prompt, pv, pm)), alone(model, make(prompt, other, pm))]


def test_frames_encoded_in_chunks_equal_one_call(model, requests):
    from idefics3.generation.prefill import encode_frames

    _, pv, pm = requests[2]  # 2 images: 5 + 3 frames
    with torch.inference_mode():
        whole = encode_frames(model, pv, pm, max_frames=64)
        for chunk in (1, 3):
            got = encode_frames(model, pv, pm, max_frames=chunk)
            assert got.shape == whole.shape
            torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


@pytest.mark.parametrize("fast_decode", [False, True], ids=["plain-decode", "fused-decode"])
def test_a_cache_full_of_garbage_is_never_read(model, requests, fast_decode):
    """The engine allocates its cache unzeroed and zeroes positions only as calls reach them: with NaN in every
    position at the start, sequences of different lengths batched together still equal each alone (the plain
    decode reads the positions past a shorter row's end, masked: they must be finite)."""
    solo = [alone(model, make(*r)) for r in requests]
    engine = Engine(model, max_batch=4, max_seq_len=256, fast_decode=fast_decode)
    with torch.inference_mode():
        for buf in (*engine.cache.k, *engine.cache.v):
            buf.fill_(float("nan"))
    got, _ = run(engine, [make(*r) for r in requests], add_at=[0, 0, 2, 3])
    assert got == solo
