"""Cached decoding equals the full forward; sequences of different lengths in one cache equal each alone."""

from __future__ import annotations

import torch

from idefics3 import Idefics3ForConditionalGeneration
from inputs import pixels, prompt


def load(tiny_checkpoint):
    return Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_token_by_token_decode_equals_full_forward(tiny_checkpoint):
    model = load(tiny_checkpoint)
    ids, pv = prompt([1], 4, length=20), pixels(1, [1], 32)
    full = model(ids, pixel_values=pv).logits  # [1, 20, V]
    cache = model.make_cache(max_batch=2, max_seq_len=64)
    pre = 8  # prefill the first 8 tokens (the image block included), then one token at a time
    pos = torch.arange(20)[None]
    out = [model(ids[:, :pre], position_ids=pos[:, :pre], pixel_values=pv, kv_cache=cache).logits]
    for t in range(pre, 20):
        out.append(model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], kv_cache=cache).logits)
    assert rel_err(torch.cat(out, dim=1), full) < 1e-5


@torch.no_grad()
def test_sequences_of_different_lengths_decoded_together_equal_each_alone(tiny_checkpoint):
    model = load(tiny_checkpoint)
    a, b = prompt([1], 4, length=12, seed=3), prompt([0], 4, length=7, seed=4)
    pv = pixels(1, [1], 32)
    steps = 6
    g = torch.Generator().manual_seed(0)
    follow = torch.randint(3, 1000, (2, steps), generator=g)  # the tokens each row is fed while decoding

    def alone(ids, row, **kw):
        cache = model.make_cache(1, 32)
        n = ids.shape[1]
        logits = [model(ids, position_ids=torch.arange(n)[None], kv_cache=cache, **kw).logits[:, -1]]
        for s in range(steps):
            logits.append(model(follow[row:row + 1, s:s + 1], position_ids=torch.tensor([[n + s]]),
                                kv_cache=cache).logits[:, -1])
        return torch.cat(logits)

    ref_a, ref_b = alone(a, 0, pixel_values=pv), alone(b, 1)
    # Together: slot 2 holds `a`, slot 0 holds `b` (slots need not be in order), prefilled separately.
    cache = model.make_cache(3, 32)
    slots = torch.tensor([2, 0])
    la = model(a, position_ids=torch.arange(12)[None], pixel_values=pv, kv_cache=cache,
               cache_slots=slots[:1]).logits[:, -1]
    lb = model(b, position_ids=torch.arange(7)[None], kv_cache=cache, cache_slots=slots[1:]).logits[:, -1]
    got_a, got_b = [la], [lb]
    for s in range(steps):
        pos = torch.tensor([[12 + s], [7 + s]])
        logits = model(follow[:, s:s + 1], position_ids=pos, kv_cache=cache, cache_slots=slots).logits[:, -1]
        got_a.append(logits[:1])
        got_b.append(logits[1:])
    assert rel_err(torch.cat(got_a), ref_a) < 1e-5
    assert rel_err(torch.cat(got_b), ref_b) < 1e-5


@torch.no_grad()
def test_right_padded_batched_prefill_matches_single_prefills(tiny_checkpoint):
    """Rows of different lengths prefilled in one call (right padded): junk beyond a row's length is
    never attended and is overwritten by that row's next decode step."""
    model = load(tiny_checkpoint)
    a, b = prompt([0], 4, length=10, seed=5), prompt([0], 4, length=6, seed=6)
    batch = torch.full((2, 10), 2)
    batch[0], batch[1, :6] = a[0], b[0]
    cache = model.make_cache(2, 32)
    pos = torch.arange(10).expand(2, 10)
    logits = model(batch, position_ids=pos, kv_cache=cache).logits
    nxt = torch.tensor([[5], [9]])
    step = model(nxt, position_ids=torch.tensor([[10], [6]]), kv_cache=cache).logits[:, -1]
    ref_b = model(torch.cat([b, nxt[1:]], dim=1)).logits
    ref_a = model(torch.cat([a, nxt[:1]], dim=1)).logits
    assert rel_err(logits[1, :6], ref_b[0, :6]) < 1e-5
    assert rel_err(step[1], ref_b[0, -1]) < 1e-5
    assert rel_err(step[0], ref_a[0, -1]) < 1e-5


def test_prepare_zeroes_only_what_was_never_written():
    """zero=False: `prepare` makes the positions a call may read finite (ZERO_AHEAD more), never touching what was
    written below; `copy` counts as writing; other slots stay as allocated."""
    from idefics3.model import kv_cache

    cache = kv_cache.KVCache(2, 3, 600, 1, 4, torch.float32, "cpu", zero=False)
    for buf in (*cache.k, *cache.v):
        buf.fill_(float("nan"))  # what torch.empty may hold
    cache.prepare([1], 10)
    k = torch.ones(1, 1, 10, 4)
    cache.update(0, torch.tensor([1]), torch.arange(10)[None], k, k, 10)
    end = 10 + kv_cache.ZERO_AHEAD
    assert torch.equal(cache.k[0][1, :, :10], k[0]) and (cache.k[0][1, :, 10:end] == 0).all()
    assert cache.k[1][1, :, end:].isnan().all() and cache.v[0][0].isnan().all()
    cache.prepare([1], end)  # already finite: the written positions are kept
    assert torch.equal(cache.k[0][1, :, :10], k[0])
    cache.prepare([1], end + 1)
    reach = end + 1 + kv_cache.ZERO_AHEAD
    assert torch.equal(cache.k[0][1, :, :10], k[0]) and (cache.v[1][1, :, :reach] == 0).all()
    assert cache.v[1][1, :, reach:].isnan().all()
    cache.copy(1, 2, 20)
    assert torch.equal(cache.k[0][2, :, :10], k[0]) and cache.k[0][2, :, 20:].isnan().all()
    cache.prepare([2], 20)  # finite up to 20 from the copy: nothing to zero
    assert cache.k[0][2, :, 20:].isnan().all()
