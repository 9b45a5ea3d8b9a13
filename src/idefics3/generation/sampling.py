"""Per-sequence sampling settings and the pure logit transforms that implement them.

Every transform takes fp32 logits [R, V] and one setting per row ([R] tensors), so that a batch whose
rows asked for different temperatures or top-p values is processed in one pass. Each transform is
the same arithmetic as the transformers LogitsProcessor of the same name (same ops, same order of
operations, same tie handling), applied in transformers' order:

    repetition penalty -> presence/frequency penalty -> (min_new_tokens eos ban, grammar mask: the engine)
    -> temperature -> top_k -> top_p -> min_p

The presence and frequency penalties are OpenAI's (subtract `presence * [count > 0] + frequency * count` from
a token's logit, counting the tokens generated so far); transformers has no equivalent.

A row whose setting is neutral (temperature 1, top_k 0, top_p 1, min_p 0, penalty 1) is left exactly
unchanged. Drawing uses the exponential-race form of categorical sampling, argmax(p / q) with
q ~ Exp(1), which needs no host sync, and consumes the same random numbers whatever the
probabilities are: a row with its own torch.Generator therefore draws the same tokens alone or
inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SamplingParams:
    """How one sequence picks its tokens and when it stops (ids only; stop strings live in stopping.py).

    temperature 0 means greedy (argmax). top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are off.
    stop_token_ids None means the engine's default eos ids; min_new_tokens bans them until reached.
    presence_penalty, frequency_penalty: OpenAI's, in [-2, 2], 0 = off. logprobs: None, or how many of the most
    likely tokens to report with each token's own log-probability (0: only its own).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError("max_new_tokens and min_new_tokens must be >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---- pure transforms: logits [R, V] fp32, settings [R] ------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens already seen ([R, V] bool) by the row's penalty."""
    p = penalty[:, None]
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: counts [R, V] of each token generated so far; presence, frequency [R]."""
    counts = counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits / temperature[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Keep the tokens whose logit is at least the row's k-th largest (ties kept); top_k 0 keeps all.

    `k_max` (the largest top_k, known on the host) avoids a device sync when given.
    """
    k = top_k.clamp(min=0, max=logits.shape[-1])
    k_max = min(int(k.max()) if k_max is None else k_max, logits.shape[-1])
    if k_max <= 0:
        return logits
    top = torch.topk(logits, k_max).values  # [R, k_max], descending
    kth = top.gather(1, (k - 1).clamp(min=0)[:, None])  # [R, 1]
    kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is at most 1 - top_p."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # 1 - top_p is formed in float64 then rounded, as transformers' Python scalar is; rows at 1.0 drop nothing.
    threshold = torch.where(top_p >= 1.0, torch.full_like(top_p, -1.0), (1.0 - top_p.double()).to(logits.dtype))
    remove_sorted = cumulative <= threshold[:, None]
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability (the top token stays)."""
    probs = torch.softmax(logits, dim=-1)
    top_probs = probs.amax(dim=-1, keepdim=True)
    remove = probs < min_p[:, None] * top_probs
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return logits.masked_fill(remove, -float("inf"))


def ban_tokens(logits: torch.Tensor, rows: list[int], token_ids: list[list[int]]) -> torch.Tensor:
    """Set logits[row, ids] to -inf for each listed row (eos before min_new_tokens); in place."""
    for row, ids in zip(rows, token_ids):
        if ids:
            logits[row, ids] = -float("inf")
    return logits


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One categorical draw per row as argmax(p / q), q ~ Exp(1); a row with a generator uses only it."""
    q = torch.empty_like(probs)
    if all(g is None for g in generators):
        q.exponential_()
    else:
        for i, g in enumerate(generators):
            if g is None or g.device == probs.device:
                q[i].exponential_(generator=g)
            else:  # a generator on another device (a CPU generator for a CUDA model)
                q[i] = torch.empty(probs.shape[-1], dtype=probs.dtype, device=g.device).exponential_(generator=g)
    q.clamp_(min=torch.finfo(q.dtype).tiny)  # q == 0 would turn a zero probability into nan
    return (probs / q).argmax(dim=-1)


class BatchSampler:
    """The per-row settings of one batch as device tensors, built once while the batch stays the same.

    `__call__(logits, seen)` turns the fp32 next-token logits [R, V] into token ids [R] on the device.
    """

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator | None],
                 device: torch.device | str) -> None:
        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        self.size = len(params)
        self.generators = generators
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        self.use_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.penalty = col([p.repetition_penalty for p in params], torch.float32)
        self.use_counts = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
        self.presence = col([p.presence_penalty for p in params], torch.float32)
        self.frequency = col([p.frequency_penalty for p in params], torch.float32)
        self.is_greedy = col([p.greedy for p in params], torch.bool)
        sampled = [p for p in params if not p.greedy]
        self.use_temperature = any(p.temperature != 1.0 for p in sampled)
        self.use_top_k = any(p.top_k > 0 for p in sampled)
        self.use_top_p = any(p.top_p < 1.0 for p in sampled)
        self.use_min_p = any(p.min_p > 0.0 for p in sampled)
        self.temperature = col([p.temperature if not p.greedy else 1.0 for p in params], torch.float32)
        self.top_k = col([0 if p.greedy else p.top_k for p in params], torch.long)
        self.k_max = max((p.top_k for p in sampled), default=0)
        self.top_p = col([p.top_p for p in params], torch.float32)
        self.min_p = col([p.min_p for p in params], torch.float32)

    def warp(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The logits the sampled rows draw from: penalty, then temperature, top_k, top_p, min_p."""
        if self.use_penalty and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.penalty)
        if self.use_temperature:
            logits = apply_temperature(logits, self.temperature)
        if self.use_top_k:
            logits = apply_top_k(logits, self.top_k, self.k_max)
        if self.use_top_p:
            logits = apply_top_p(logits, self.top_p)
        if self.use_min_p:
            logits = apply_min_p(logits, self.min_p)
        return logits

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None) -> torch.Tensor:
        """seen [R, V] bool: tokens of the prompt or generated (repetition penalty); counts [R, V]: generated."""
        if self.use_penalty and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.penalty)
        if self.use_counts and counts is not None:
            logits = apply_presence_frequency(logits, counts, self.presence, self.frequency)
        if self.all_greedy:
            return logits.argmax(dim=-1)
        greedy = logits.argmax(dim=-1) if self.any_greedy else None
        sampled = draw(torch.softmax(self.warp(logits), dim=-1), self.generators)
        return sampled if greedy is None else torch.where(self.is_greedy, greedy, sampled)
