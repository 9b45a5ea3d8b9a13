"""The encoder cache: a second question about the same image skips the vision encoder and changes nothing."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from idefics3 import Idefics3ForConditionalGeneration
from idefics3.generation.encoder_cache import EncoderCache


def inputs_for(processor, image, question: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, images=[image], return_tensors="pt")


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8))


def count_encoder_calls(model, monkeypatch) -> list[int]:
    """The frames of each call of the vision encoder (an image's frames may go in several calls)."""
    calls = []
    original = model.get_image_features

    def spy(pixel_values, *args, **kwargs):
        calls.append(pixel_values.shape[1])  # [1, N, 3, H, W]
        return original(pixel_values, *args, **kwargs)

    monkeypatch.setattr(model, "get_image_features", spy)
    return calls


def test_second_question_hits_and_answers_the_same(tiny_checkpoint, processor, monkeypatch):
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    calls = count_encoder_calls(model, monkeypatch)
    cache = EncoderCache()
    a = inputs_for(processor, picture(0), "What is this?")
    b = inputs_for(processor, picture(0), "And the colour?")
    frames = a["pixel_values"].shape[1]
    first = model.generate(**a, max_new_tokens=6, encoder_cache=cache)
    assert sum(calls) == frames and cache.misses == frames  # counted in frames
    second = model.generate(**b, max_new_tokens=6, encoder_cache=cache)
    assert sum(calls) == frames and cache.hits == frames  # the encoder did not run again
    uncached = model.generate(**b, max_new_tokens=6, encoder_cache=False)
    assert sum(calls) == 2 * frames
    assert torch.equal(second, uncached)
    again = model.generate(**a, max_new_tokens=6, encoder_cache=cache)
    assert torch.equal(first, again)


def test_other_image_or_resolution_misses(tiny_checkpoint, processor, monkeypatch):
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    calls = count_encoder_calls(model, monkeypatch)
    cache = EncoderCache()
    model.generate(**inputs_for(processor, picture(0), "What?"), max_new_tokens=2, encoder_cache=cache)
    model.generate(**inputs_for(processor, picture(1), "What?"), max_new_tokens=2, encoder_cache=cache)
    split = sum(calls)
    from idefics3 import Idefics3Processor

    small = Idefics3Processor.from_pretrained(tiny_checkpoint, do_image_splitting=False)
    model.generate(**inputs_for(small, picture(0), "What?"), max_new_tokens=2, encoder_cache=cache)
    assert sum(calls) == split + 1 and cache.hits == 0 and len(cache) == split + 1  # one frame without splitting


def test_weight_update_invalidates(tiny_checkpoint, processor, monkeypatch):
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    calls = count_encoder_calls(model, monkeypatch)
    inputs = inputs_for(processor, picture(0), "What?")
    frames = inputs["pixel_values"].shape[1]
    model.generate(**inputs, max_new_tokens=2)  # the default: a cache kept per model
    model.generate(**inputs, max_new_tokens=2)
    assert sum(calls) == frames
    with torch.no_grad():
        model.model.connector.modality_projection.proj.weight.mul_(1.5)  # e.g. an optimiser step
    model.generate(**inputs, max_new_tokens=2)
    assert sum(calls) == 2 * frames


def test_byte_budget_evicts_least_recently_used():
    cache = EncoderCache(max_bytes=3 * 400)
    feats = {i: torch.full((10, 10), float(i)) for i in range(4)}  # 400 bytes each: one frame's features
    for i in range(3):
        cache.put(("m", i), feats[i])
    assert cache.get(("m", 0)) is not None  # 0 becomes the most recent
    cache.put(("m", 3), feats[3])
    assert cache.get(("m", 1)) is None and cache.get(("m", 0)) is not None and len(cache) == 3


def test_copies_and_threads():
    """A copy (a deep-copied model) gets its own lock; threads putting and getting at once keep the byte count."""
    import copy
    import threading

    cache = EncoderCache(max_bytes=64 * 4 * 10)
    twin = copy.deepcopy(cache)
    assert twin._lock is not cache._lock

    def work(offset: int) -> None:
        for i in range(200):
            cache.put((offset, i), torch.zeros(64))
            cache.get((offset, i - 1))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 10 and cache.nbytes == 64 * 4 * 10
