"""The pure logit transforms equal transformers' LogitsProcessors, row by row, on random logits."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from idefics3.generation.sampling import (
    BatchSampler,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw,
)

V = 300


def random_logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * scale
    logits[:, :20] = logits[:, 20:40]  # ties, which top-k and top-p must treat as transformers does
    return logits


def per_row(transform, logits, settings):
    """transformers' processor applied to each row alone, stacked."""
    return torch.cat([transform(s)(None, logits[i:i + 1].clone()) for i, s in enumerate(settings)])


def test_temperature():
    temps = [0.3, 1.0, 1.7, 0.05]
    logits = random_logits(4)
    ours = apply_temperature(logits, torch.tensor(temps))
    assert torch.equal(ours, per_row(TemperatureLogitsWarper, logits, temps))


@pytest.mark.parametrize("seed", [0, 1])
def test_top_k(seed):
    ks = [1, 5, 37, V + 10, 0]
    logits = random_logits(5, seed)
    ours = apply_top_k(logits, torch.tensor(ks))
    expected = per_row(lambda k: TopKLogitsWarper(k) if k else (lambda _, x: x), logits, ks)
    assert torch.equal(ours, expected)
    assert torch.equal(apply_top_k(logits, torch.tensor(ks), k_max=V), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_p(seed):
    ps = [0.9, 0.5, 0.01, 1.0, 0.999, 0.0]
    logits = random_logits(6, seed)
    ours = apply_top_p(logits, torch.tensor(ps))
    expected = per_row(lambda p: TopPLogitsWarper(p) if p < 1 else (lambda _, x: x), logits, ps)
    assert torch.equal(ours, expected)


def test_top_p_after_top_k():
    """top-p on logits that already hold -inf (rows at top_p 1.0 must stay exactly unchanged)."""
    logits = apply_top_k(random_logits(3), torch.tensor([10, 10, 10]))
    ps = [0.7, 1.0, 0.95]
    expected = per_row(lambda p: TopPLogitsWarper(p) if p < 1 else (lambda _, x: x), logits, ps)
    assert torch.equal(apply_top_p(logits, torch.tensor(ps)), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_min_p(seed):
    ps = [0.05, 0.2, 0.0, 1.0]
    logits = random_logits(4, seed, scale=1.5)
    ours = apply_min_p(logits, torch.tensor(ps))
    assert torch.equal(ours, per_row(MinPLogitsWarper, logits, ps))


def test_repetition_penalty_matches_transformers_with_left_padding():
    logits = random_logits(3)
    ids = torch.tensor([[2, 2, 7, 9, 7, 250], [11, 12, 13, 14, 15, 11], [2, 2, 2, 2, 40, 41]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    penalty = 1.3
    expected = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=(mask != 0).int().argmax(1))(
        ids, logits.clone())
    seen = torch.zeros(3, V, dtype=torch.bool)
    for i in range(3):
        seen[i, ids[i][mask[i].bool()]] = True
    ours = apply_repetition_penalty(logits, seen, torch.full((3,), penalty))
    assert torch.equal(ours, expected)


def test_neutral_settings_leave_logits_unchanged():
    logits = random_logits(2)
    assert torch.equal(apply_top_k(logits, torch.tensor([0, 0])), logits)
    assert torch.equal(apply_top_p(logits, torch.tensor([1.0, 1.0])), logits)
    assert torch.equal(apply_min_p(logits, torch.tensor([0.0, 0.0])), logits)
    assert torch.equal(apply_temperature(logits, torch.tensor([1.0, 1.0])), logits)


def test_full_chain_in_transformers_order():
    """Mixed rows through BatchSampler.warp == each row through transformers' warper list."""
    settings = [SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
                SamplingParams(temperature=1.3, top_k=0, top_p=0.8),
                SamplingParams(temperature=1.0, top_k=5),
                SamplingParams(temperature=0.5, min_p=0.1, top_p=1.0)]
    logits = random_logits(4, seed=3)
    sampler = BatchSampler(settings, [None] * 4, "cpu")
    ours = sampler.warp(logits.clone())
    for i, p in enumerate(settings):
        chain = LogitsProcessorList()
        if p.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            chain.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            chain.append(TopPLogitsWarper(p.top_p))
        chain.append(MinPLogitsWarper(p.min_p))
        assert torch.equal(ours[i], chain(None, logits[i:i + 1].clone())[0]), i


def test_greedy_rows_are_argmax_in_a_mixed_batch():
    logits = random_logits(3)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams()]
    gens = [None, torch.Generator().manual_seed(1), None]
    tokens = BatchSampler(params, gens, "cpu")(logits.clone())
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_draw_per_row_generator_is_independent_of_the_batch():
    probs = torch.softmax(random_logits(4, scale=1.0), dim=-1)
    alone = draw(probs[2:3], [torch.Generator().manual_seed(5)])
    torch.manual_seed(0)
    batch = draw(probs, [None, torch.Generator().manual_seed(9), torch.Generator().manual_seed(5), None])
    assert batch[2] == alone[0]


def test_draw_follows_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    torch.manual_seed(0)
    tokens = draw(p.expand(20000, 5).clone(), [None] * 20000)
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    assert torch.allclose(freq, p, atol=0.015)
    assert freq[4] == 0


def test_sampling_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError):
        SamplingParams(repetition_penalty=0)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy
