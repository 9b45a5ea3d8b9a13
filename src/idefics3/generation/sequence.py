"""What the engine is asked (`Request`), what it answers (`TokenEvent`), and its state per sequence (`Sequence`).

A request is token ids and tensors only. Three things arrive as opaque objects, so that the engine never sees
strings: a `StopCondition` (stop strings, stopping.py), a `TokenConstraint` (grammar-constrained decoding: which
tokens may come next) and, optionally, the frames' content digests (`frame_keys`), which a server computes off
the engine's thread (encoder_cache.frame_digests).

A sequence's prompt is described for the prefix cache by `keys`: its token ids, except that every `<image>`
position is replaced by a key made of its frame's content digest and its offset in the frame. Two prompts
whose text is the same but whose pictures differ therefore share no keys past the first image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .sampling import SamplingParams
from .stopping import StopCondition


class TokenConstraint(Protocol):
    """Which tokens a sequence may produce next (e.g. a JSON grammar); one object per sequence."""

    def allowed(self) -> torch.Tensor | None:
        """bool [n] (n <= vocab size; ids >= n are disallowed) of the tokens allowed next, or None for all."""

    def accept(self, token_id: int) -> None:
        """Advance past the token the engine chose (always an allowed one)."""


@dataclass
class Request:
    """One prompt to continue. Frames are this prompt's real image tiles, in prompt order."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    pixel_values: torch.Tensor | None = None          # [N, 3, H, W]
    pixel_attention_mask: torch.Tensor | None = None  # [N, H, W]
    image_hidden_states: torch.Tensor | None = None   # [N, S_img, D_text], precomputed instead of pixels
    stop: StopCondition | None = None                 # e.g. StopStrings
    generator: torch.Generator | None = None          # overrides params.seed
    constraint: TokenConstraint | None = None         # e.g. a JSON schema (serving/grammar.py)
    frame_keys: list[str] | None = None               # frame_digests(...) of the frames, if already computed

    @property
    def frames(self) -> torch.Tensor | None:
        return self.image_hidden_states if self.image_hidden_states is not None else self.pixel_values

    @property
    def n_frames(self) -> int:
        frames = self.frames
        return 0 if frames is None else int(frames.shape[0])


@dataclass(slots=True)
class TokenEvent:
    """A token produced by `step()`; finish_reason is set on a sequence's last event.

    logprob / top_logprobs (when the request's params ask for them): the model's log-probabilities of the token
    and of the most likely tokens at that step, from the raw logits (before penalties, temperature, grammar).
    cached_tokens, on a sequence's first event: how many prompt tokens came from the prefix cache.
    """

    seq_id: int
    token_id: int
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    cached_tokens: int | None = None


@dataclass(eq=False)
class Sequence:
    """The engine's state of one request, from waiting through prefill to decoding."""

    id: int
    request: Request
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    keys: list[int]                      # prefix-cache keys of the prompt, one per prompt position
    image_positions: list[int]           # prompt positions of the <image> tokens, in order
    slot: int = -1
    prefilled: int = 0                   # prompt positions whose keys/values are in the slot
    reused: int = 0                      # of those, taken from the prefix cache
    features: list[torch.Tensor | None] = field(default_factory=list)  # per frame [S_img, D] once encoded
    generated: list[int] = field(default_factory=list)
    leader: Sequence | None = None       # same prompt and images: copies that sequence's prefill
    followers: list[Sequence] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.generated)

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= self.prompt_len


def prompt_keys(prompt_ids: list[int], image_token_id: int, image_seq_len: int, frame_keys: list[str]
                ) -> tuple[list[int], list[int]]:
    """(keys, image positions) of a prompt: token ids, with each `<image>` position keyed by its frame's digest
    and offset instead (a negative number, so never equal to a token id)."""
    keys = [int(t) for t in prompt_ids]
    positions = [i for i, t in enumerate(keys) if t == image_token_id]
    frame_bases = [int(k[:15], 16) << 16 for k in frame_keys]  # 60 bits of the digest, 16 for the offset
    for k, pos in enumerate(positions):
        keys[pos] = -1 - (frame_bases[k // image_seq_len] | (k % image_seq_len))
    return keys, positions


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """The length of the common prefix of a and b, at most limit."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    for i, (x, y) in enumerate(zip(itertools.islice(a, n), itertools.islice(b, n))):
        if x != y:
            return i
    return n
