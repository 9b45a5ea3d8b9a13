"""The incremental generation engine: many sequences, each in a slot of one preallocated KV cache.

    engine = Engine(model, max_batch=8, max_seq_len=4096)
    sid = engine.add(Request(prompt_ids, SamplingParams(temperature=0.7, seed=1), pixel_values=frames))
    while engine.has_work():
        for event in engine.step():   # TokenEvent(seq_id, token_id, finish_reason, ...)
            ...

A `step()` decodes one token for every running sequence, retires the finished ones (freeing their slots),
admits waiting sequences into free slots, and spends one chunk of prefill work on the admitted ones
(prefill.py: their image frames, then their prompts, several prompts in one left-padded forward). A sequence
whose prompt is complete gets its first token and decodes from the next step on. With `max_prefill_chunk`
None (the library's default) a chunk is unbounded, so a batch of prompts is encoded and prefilled in one
step; a server bounds it, so that running streams keep getting tokens while a large image is prefilled.
Every sequence carries its own SamplingParams and torch.Generator, so a seeded sequence draws the same
tokens whatever else is in the batch.

Sequences admitted together with the same prompt and images (n completions of one prompt, best-of-n) are
prefilled once: the others copy that prompt's keys and values into their own slots and sample from its
logits. While the first one runs, the fused decoder reads the prompt's keys from that one slot for all of
them (`shared`), so a step reads them once instead of once per sequence.

Prefix caching (prefix_cache.py): a finished sequence's slot keeps its keys and values, and a new prompt
that starts the same way (token ids and image contents) reuses the longest such prefix, from a free slot in
place or copied from a slot in use. `prefix_cache_slots` adds slots that only serve as that cache.

The engine sees token ids and pixel tensors only: no strings, no tokenizer, no HTTP. Stop strings and
grammars arrive as opaque objects (sequence.py). In steady decoding the only host<->device traffic is
reading the sampled ids once per step: the next step's input ids and positions stay on the device and are
only rebuilt from host lists when the set of running sequences changes.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kernels.backend import Backend
from .encoder_cache import EncoderCache, frame_digests
from .prefill import FrameEncoder, plan_rows, run_rows
from .prefix_cache import SlotPool
from .sampling import BatchSampler, ban_tokens
from .sequence import Request, Sequence, TokenEvent, prompt_keys
from .stopping import finish_reason

if TYPE_CHECKING:  # the network class, for type hints only
    from ..model.idefics3 import Idefics3

DEFAULT_MAX_SEQ_LEN = 4096
UNBOUNDED = 1 << 62

__all__ = ["Engine", "Request", "TokenEvent", "DEFAULT_MAX_SEQ_LEN"]


class Engine:
    """Steps a changing batch of sequences together over one `model.make_cache(slots, max_seq_len)`.

    max_batch: sequences in flight (prefilling or decoding) at once. max_seq_len (prompt + new tokens per
    sequence) defaults to 4096, or the model's context if shorter: the cache is allocated up front, and a
    context of 131072 (Idefics3-8B) would not fit. max_prefill_chunk: the prefill work of one step, in prompt
    tokens (a frame counts as `prefill.frame_cost`); None = unbounded, max_prefill_tokens then caps one padded
    prefill. prefix_cache: keep finished sequences' keys and values for later prompts with the same start;
    prefix_cache_slots: extra cache rows for that. backend: the model's kernel backend (default
    `model.backend`): decode steps go through its fused decoder where it has one, and fast_decode=False keeps
    them on the model's forward. The engine never changes the model. Not thread-safe: drive add/step/abort
    from one thread.
    """

    def __init__(self, model: Idefics3, max_batch: int = 8, max_seq_len: int | None = None,
                 eos_token_ids: list[int] | None = None, max_prefill_tokens: int = 16384,
                 pad_token_id: int | None = None, encoder_cache: EncoderCache | None = None,
                 fast_decode: bool = True, backend: Backend | None = None, max_prefill_chunk: int | None = None,
                 prefix_cache: bool = True, prefix_cache_slots: int = 0) -> None:
        text = model.config.text_config
        if eos_token_ids is None:
            from .config import GenerationConfig  # only for the default; the engine itself reads no files

            eos_token_ids = GenerationConfig.for_model(model).eos_token_id
        if max_batch < 1 or prefix_cache_slots < 0:
            raise ValueError(f"max_batch must be >= 1 and prefix_cache_slots >= 0, got {max_batch}, "
                             f"{prefix_cache_slots}")
        if max_prefill_chunk is not None and max_prefill_chunk < 1:
            raise ValueError(f"max_prefill_chunk must be >= 1 (or None), got {max_prefill_chunk}")
        self.model = model
        self.encoder_cache = encoder_cache
        self.device = model.device
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, text.max_position_embeddings)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_chunk = max_prefill_chunk
        self.pad_token_id = pad_token_id if pad_token_id is not None else (text.pad_token_id or 0)
        self.image_token_id = model.config.image_token_id
        self.image_seq_len = model.config.image_seq_len
        self.vocab_size = text.vocab_size
        n_slots = max_batch + prefix_cache_slots
        with torch.inference_mode():
            self.cache = model.make_cache(n_slots, self.max_seq_len, zero=False)  # zeroed as reached (prepare)
        if backend is None:
            backend = getattr(model, "backend", None)
        self.fast_decoder = backend.decoder_for(model, self.cache) if fast_decode and backend is not None else None
        self.slots = SlotPool(n_slots, enabled=prefix_cache)
        self.frames = FrameEncoder(model, encoder_cache)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, prompt not complete yet (followers included)
        self.running: list[Sequence] = []
        self.seen: torch.Tensor | None = None    # [slots, V] bool, for repetition penalties
        self.counts: torch.Tensor | None = None  # [slots, V] int32 generated tokens, for presence/frequency
        self._ids = itertools.count()
        self._batch: _DecodeBatch | None = None  # device state of `running`; None when it changed

    # ---- the public loop --------------------------------------------------------------------------
    def add(self, request: Request) -> int:
        """Queue a request; returns its sequence id. Raises ValueError on a request that cannot run."""
        if isinstance(request.prompt_ids, torch.Tensor):
            request.prompt_ids = request.prompt_ids.tolist()
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; this engine holds at most {self.max_seq_len - 1} "
                             "(max_seq_len) with room for one new token")
        _check_images(request, self.image_token_id, self.image_seq_len)
        if request.frame_keys is None:
            request.frame_keys = frame_digests(request.frames, request.pixel_attention_mask
                                               if request.image_hidden_states is None else None)
        elif len(request.frame_keys) != request.n_frames:
            raise ValueError(f"{len(request.frame_keys)} frame keys for {request.n_frames} frames")
        params = request.params
        generator = request.generator
        if generator is None and params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = self.eos_token_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        keys, positions = prompt_keys(request.prompt_ids, self.image_token_id, self.image_seq_len,
                                      request.frame_keys)
        seq = Sequence(next(self._ids), request, stop_ids, generator, keys, positions)
        self.waiting.append(seq)
        return seq.id

    def abort(self, seq_id: int) -> bool:
        """Drop a waiting, prefilling or running sequence (its slot is freed); False if it is not known."""
        for seq in self.waiting:
            if seq.id == seq_id:
                self.waiting.remove(seq)
                return True
        for seq in [*self.prefilling, *self.running]:
            if seq.id == seq_id:
                self._retire([seq])
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def free_slots(self) -> list[int]:
        """Cache slots no sequence holds (they may still hold a reusable prefix)."""
        return self.slots.free_slots()

    @property
    def in_flight(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return len(self.prefilling) + len(self.running)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Decode the running sequences by one token, then admit waiting ones and prefill one chunk."""
        events: list[TokenEvent] = []
        if self.running:
            events += self._decode()
        self._admit()
        if self.prefilling:
            events += self._prefill_chunk()
        return events

    # ---- decode -----------------------------------------------------------------------------------
    def _decode(self) -> list[TokenEvent]:
        batch = self._batch
        if batch is None:
            batch = self._batch = _DecodeBatch.build(self.running, self.device)
        kv_len = max(s.total_len for s in self.running)  # the newest token sits at total_len - 1
        self.cache.prepare((s.slot for s in self.running), kv_len)
        if self.fast_decoder is not None:
            logits = self.fast_decoder(batch.input_ids, batch.positions, batch.slots, kv_len,
                                       batch.shared)  # [R, 1, V]
        else:
            logits = self.model(batch.input_ids, position_ids=batch.positions, kv_cache=self.cache,
                                cache_slots=batch.slots, logits_to_keep=1, kv_len=kv_len).logits
        logits = logits[:, -1].float()  # [R, V]
        tokens = self._sample(logits, self.running, batch.sampler, batch.slot_ids)
        batch.input_ids = tokens[:, None]
        batch.positions = batch.positions + 1
        return self._record(self.running, tokens, logits)

    # ---- admission and prefill --------------------------------------------------------------------
    def _admit(self) -> None:
        """Move waiting sequences into slots: the one holding their longest cached prefix, else the oldest."""
        while self.waiting and self.in_flight < self.max_batch:
            seq = self.waiting.popleft()
            leader = next((s for s in self.prefilling if s.leader is None and s.keys == seq.keys), None)
            occupied = [(s.slot, s.keys, s.prefilled) for s in self.prefilling if s.leader is None] + \
                       [(s.slot, s.keys, s.prompt_len) for s in self.running]
            slot, reuse, source = self.slots.take(seq.keys if leader is None else [], occupied)
            seq.slot = slot
            if leader is not None:  # the same prompt and images: one prefill serves both
                seq.leader = leader
                leader.followers.append(seq)
                seq.features = leader.features
            else:
                self.frames.attach(seq)
            if leader is None and reuse:
                if source is not None:
                    self.cache.copy(source, slot, reuse)
                seq.prefilled = seq.reused = reuse
            self.prefilling.append(seq)

    def _prefill_chunk(self) -> list[TokenEvent]:
        """One chunk of prefill: frames first, then prompt tokens; sequences whose prompt completes start."""
        leaders = [s for s in self.prefilling if s.leader is None]
        if self.max_prefill_chunk is None or not self.running:  # nothing to keep responsive: all at once
            budget = UNBOUNDED
        else:
            budget = self.max_prefill_chunk
        spent = self.frames.encode(leaders, budget)
        token_budget = min(budget - spent, self.max_prefill_tokens) if budget != UNBOUNDED \
            else self.max_prefill_tokens
        if spent and token_budget < 1:
            return []
        rows = plan_rows(leaders, max(int(token_budget), 1), self.image_seq_len)
        if not rows:
            return []
        logits = run_rows(self.model, self.cache, rows, self.pad_token_id)  # [G, V]
        done, done_rows = [], []
        for g, (seq, n) in enumerate(rows):
            seq.prefilled += n
            if seq.prefill_done:
                for s in (seq, *seq.followers):
                    done.append(s)
                    done_rows.append(g)
        if not done:
            return []
        for s in done:
            if s.leader is not None:
                self.cache.copy(s.leader.slot, s.slot, s.prompt_len)
                s.prefilled = s.prompt_len
        if any(s.request.params.repetition_penalty != 1.0 for s in done):
            self._mark_prompts(done)
        if self.counts is not None or any(_uses_counts(s) for s in done):
            self._reset_counts(done)
        slot_ids = torch.tensor([s.slot for s in done], dtype=torch.long, device=self.device)
        sampler = BatchSampler([s.request.params for s in done], [s.generator for s in done], self.device)
        first = logits[done_rows]  # [D, V]
        tokens = self._sample(first, done, sampler, slot_ids)  # if this raises, they are still `prefilling`
        gone = set(done)
        self.prefilling = [s for s in self.prefilling if s not in gone]
        self.running.extend(done)
        self._batch = None
        return self._record(done, tokens, first, first_token=True)

    def _mark_prompts(self, seqs: list[Sequence]) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.cache.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        for s in seqs:
            self.seen[s.slot] = False
            prompt = torch.tensor(s.request.prompt_ids, dtype=torch.long, device=self.device)
            self.seen[s.slot, prompt.clamp(max=self.vocab_size - 1)] = True

    def _reset_counts(self, seqs: list[Sequence]) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.cache.max_batch, self.vocab_size, dtype=torch.int32, device=self.device)
        for s in seqs:
            self.counts[s.slot] = 0

    # ---- shared by both -------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], sampler: BatchSampler,
                slots: torch.Tensor) -> torch.Tensor:
        """Ban stop ids below min_new_tokens, apply grammars and the row settings, draw; tokens [R] on device.

        `logits` is left as the model gave it (the log-probabilities are read from it); the bans work on a copy."""
        banned = [(i, sorted(s.stop_ids)) for i, s in enumerate(seqs)
                  if len(s.generated) < s.request.params.min_new_tokens]
        masks = [(i, s.request.constraint.allowed()) for i, s in enumerate(seqs) if s.request.constraint is not None]
        masks = [(i, m) for i, m in masks if m is not None]
        if banned or masks:
            logits = logits.clone()
            if banned:
                ban_tokens(logits, [i for i, _ in banned], [ids for _, ids in banned])
            for i, allowed in masks:
                n = min(allowed.shape[0], logits.shape[1])
                logits[i, :n].masked_fill_(~allowed[:n].to(logits.device), -float("inf"))
                logits[i, n:] = -float("inf")
        seen = self.seen[slots] if (sampler.use_penalty and self.seen is not None) else None
        counts = self.counts[slots] if (sampler.use_counts and self.counts is not None) else None
        tokens = sampler(logits, seen, counts)
        if self.seen is not None:
            self.seen[slots, tokens] = True
        if self.counts is not None:
            self.counts[slots, tokens] += 1
        return tokens

    def _record(self, seqs: list[Sequence], tokens: torch.Tensor, logits: torch.Tensor,
                first_token: bool = False) -> list[TokenEvent]:
        ids = tokens.tolist()
        logprobs = _logprobs(logits, tokens, seqs)
        events, finished = [], []
        for i, (seq, token) in enumerate(zip(seqs, ids)):
            seq.generated.append(token)
            if seq.request.constraint is not None:
                seq.request.constraint.accept(token)
            p = seq.request.params
            reason = finish_reason(seq.generated, seq.stop_ids, p.max_new_tokens, seq.total_len,
                                   self.max_seq_len, seq.request.stop)
            lp, top = logprobs[i] if logprobs is not None else (None, None)
            events.append(TokenEvent(seq.id, token, reason, lp, top, seq.reused if first_token else None))
            if reason is not None:
                finished.append(seq)
        if finished:
            self._retire(finished)
        return events

    def _retire(self, seqs: list[Sequence]) -> None:
        gone = set(seqs)
        self.running = [s for s in self.running if s not in gone]
        self.prefilling = [s for s in self.prefilling if s not in gone]
        for s in seqs:
            for f in s.followers if not s.prefill_done else ():  # aborted mid-prefill: a follower takes over
                if f not in gone and f.leader is s:
                    self._promote(f, s)
                    break
            # positions 0..total_len-2 hold keys; the newest token's are written by the step that reads it
            held = s.keys + s.generated[:-1] if s.prefill_done else s.keys[:s.prefilled]
            self.slots.release(s.slot, held if s.leader is None or s.prefill_done else None)
            s.slot = -1
        self._batch = None

    def _promote(self, follower: Sequence, leader: Sequence) -> None:
        """Make a follower of an aborted leader prefill by itself, taking over the other followers."""
        follower.leader = None
        follower.followers = [f for f in leader.followers if f is not follower]
        for f in follower.followers:
            f.leader = follower
        if leader.prefilled:
            self.cache.copy(leader.slot, follower.slot, leader.prefilled)
            follower.prefilled = leader.prefilled


def _uses_counts(seq: Sequence) -> bool:
    p = seq.request.params
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
              ) -> list[tuple[float | None, list[tuple[int, float]] | None]] | None:
    """Per row (token log-probability, top alternatives) for the rows that asked, from the raw logits."""
    wanted = [s.request.params.logprobs for s in seqs]
    if all(w is None for w in wanted):
        return None
    rows = [i for i, w in enumerate(wanted) if w is not None]
    lp = torch.log_softmax(logits[rows], dim=-1)  # [R', V]
    chosen = lp.gather(1, tokens[rows][:, None])[:, 0].tolist()
    k = max(wanted[i] for i in rows)
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    out: list[tuple[float | None, list[tuple[int, float]] | None]] = [(None, None)] * len(seqs)
    for j, i in enumerate(rows):
        n = wanted[i]
        out[i] = (chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return out


@dataclass
class _DecodeBatch:
    """Device-side state of the running batch, kept across steps while its membership is unchanged."""

    input_ids: torch.Tensor  # [R, 1] the newest token of each row (not yet in the cache)
    positions: torch.Tensor  # [R, 1] where that token goes
    slots: torch.Tensor | None  # [R] cache rows; None when they are 0..R-1 (the cache is then read as a view)
    slot_ids: torch.Tensor  # [R] cache rows, always
    sampler: BatchSampler
    shared: torch.Tensor | None  # [R, 2] (slot, length) where a row's prompt is read from; None if nowhere

    @classmethod
    def build(cls, seqs: list[Sequence], device: torch.device) -> _DecodeBatch:
        def col(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        slot_list = [s.slot for s in seqs]
        slot_ids = col(slot_list)
        running = set(seqs)
        shared = [(s.leader.slot, s.prompt_len) if s.leader is not None and s.leader in running else (s.slot, 0)
                  for s in seqs]
        return cls(input_ids=col([s.generated[-1] for s in seqs])[:, None],
                   positions=col([s.total_len - 1 for s in seqs])[:, None],
                   slots=None if slot_list == list(range(len(seqs))) else slot_ids,
                   slot_ids=slot_ids,
                   sampler=BatchSampler([s.request.params for s in seqs], [s.generator for s in seqs], device),
                   shared=None if all(n == 0 for _, n in shared) else torch.tensor(shared, dtype=torch.long))


# ---- images -----------------------------------------------------------------------------------------
def _check_images(request: Request, image_token_id: int, image_seq_len: int) -> None:
    n_tokens = sum(1 for t in request.prompt_ids if t == image_token_id)
    n_frames = request.n_frames
    if n_tokens != n_frames * image_seq_len:
        raise ValueError(f"the prompt has {n_tokens} <image> tokens but {n_frames} image frames were given "
                         f"({image_seq_len} tokens per frame); build prompts and pixels with the processor")
