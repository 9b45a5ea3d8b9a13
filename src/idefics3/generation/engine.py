"""The incremental generation engine: many sequences, each in a slot of one preallocated KV cache.

    engine = Engine(model, max_batch=8, max_seq_len=4096)
    sid = engine.add(Request(prompt_ids, SamplingParams(temperature=0.7, seed=1), pixel_values=frames))
    while engine.has_work():
        for event in engine.step():   # TokenEvent(seq_id, token_id, finish_reason)
            ...

A `step()` decodes one token for every running sequence, retires the finished ones (freeing their
slots), then admits waiting sequences into the free slots: their images are encoded (frames of all
admitted sequences batched together), their prompts prefilled in one left-padded forward, and their
first token sampled. Every sequence carries its own SamplingParams and torch.Generator, so a
seeded sequence draws the same tokens whatever else is in the batch.

Sequences admitted together with the same prompt and images (n completions of one prompt, best-of-n, a
batch of one question) are prefilled once: the others copy that prompt's keys and values into their own
slots and sample from its logits. While its first sequence runs, the fused decoder reads the prompt's keys
from that one slot for all of them (`shared`), so a step reads them once instead of once per sequence.

The engine sees token ids and pixel tensors only: no strings, no tokenizer, no HTTP. Stop strings
arrive as opaque `StopCondition`s (stopping.py). In steady decoding the only host<->device traffic is
reading the sampled ids once per step: the next step's input ids and positions stay on the device and
are only rebuilt from host lists when the set of running sequences changes.

Batched prefill without a padding mask: row b is left-padded, its real tokens take positions
0..len_b-1 and its pad tokens the positions len_b.. after them. Each query attends to its slot's
positions up to its own, so real tokens never see the pads, and the pads' junk keys are overwritten
by the sequence's own tokens before any query can reach them.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..kernels.backend import Backend
from .encoder_cache import EncoderCache
from .sampling import BatchSampler, SamplingParams, ban_tokens
from .stopping import StopCondition, finish_reason

if TYPE_CHECKING:  # the network class, for type hints only
    from ..model.idefics3 import Idefics3

DEFAULT_MAX_SEQ_LEN = 4096


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


@dataclass(slots=True)
class TokenEvent:
    """A token produced by `step()`; finish_reason is set on a sequence's last event."""

    seq_id: int
    token_id: int
    finish_reason: str | None = None


@dataclass
class _Sequence:
    id: int
    request: Request
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    same_prompt_as: _Sequence | None = None  # prefilled by that sequence; its slot holds the same prompt

    @property
    def total_len(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)


class Engine:
    """Steps a changing batch of sequences together over one `model.make_cache(max_batch, max_seq_len)`.

    max_seq_len (prompt + new tokens per sequence) defaults to 4096, or the model's context if shorter: the
    cache is allocated up front, and a context of 131072 (Idefics3-8B) would not fit. max_prefill_tokens caps
    the padded size of one batched prefill. backend: the model's kernel backend (kernels/backend.py; by
    default the one installed at load, `model.backend`, if any): decode steps go through its fused decoder
    where it has one, and fast_decode=False keeps them on the model's forward. The engine never changes the
    model; prefill always runs the model's forward. Not thread-safe: drive add/step/abort from one thread.
    """

    def __init__(self, model: Idefics3, max_batch: int = 8, max_seq_len: int | None = None,
                 eos_token_ids: list[int] | None = None, max_prefill_tokens: int = 16384,
                 pad_token_id: int | None = None, encoder_cache: EncoderCache | None = None,
                 fast_decode: bool = True, backend: Backend | None = None) -> None:
        text = model.config.text_config
        if eos_token_ids is None:
            from .config import GenerationConfig  # only for the default; the engine itself reads no files

            eos_token_ids = GenerationConfig.for_model(model).eos_token_id
        self.model = model
        self.encoder_cache = encoder_cache
        self.device = model.device
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, text.max_position_embeddings)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_token_id = pad_token_id if pad_token_id is not None else (text.pad_token_id or 0)
        self.image_token_id = model.config.image_token_id
        self.image_seq_len = model.config.image_seq_len
        self.vocab_size = text.vocab_size
        with torch.inference_mode():
            self.cache = model.make_cache(max_batch, self.max_seq_len)
        if backend is None:
            backend = getattr(model, "backend", None)
        self.fast_decoder = backend.decoder_for(model, self.cache) if fast_decode and backend is not None else None
        self.free_slots = list(range(max_batch - 1, -1, -1))  # pop() hands out slot 0 first
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.seen: torch.Tensor | None = None  # [max_batch, V] bool, for repetition penalties
        self._ids = itertools.count()
        self._batch: _DecodeBatch | None = None  # device state of `running`; None when it changed

    # ---- the public loop --------------------------------------------------------------------------
    def add(self, request: Request) -> int:
        """Queue a request; returns its sequence id. Raises ValueError on a request that cannot run."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; this engine holds at most {self.max_seq_len - 1} "
                             "(max_seq_len) with room for one new token")
        _check_images(request, self.image_token_id, self.image_seq_len)
        params = request.params
        generator = request.generator
        if generator is None and params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = self.eos_token_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        seq = _Sequence(next(self._ids), request, stop_ids, generator)
        self.waiting.append(seq)
        return seq.id

    def abort(self, seq_id: int) -> bool:
        """Drop a waiting or running sequence (its slot is freed); False if it is not known."""
        for seq in self.waiting:
            if seq.id == seq_id:
                self.waiting.remove(seq)
                return True
        for seq in self.running:
            if seq.id == seq_id:
                self._retire([seq])
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Decode the running sequences by one token, then admit and prefill waiting ones."""
        events: list[TokenEvent] = []
        if self.running:
            events += self._decode()
        admitted = self._admit()
        if admitted:
            events += self._prefill(admitted)
        return events

    # ---- decode -----------------------------------------------------------------------------------
    def _decode(self) -> list[TokenEvent]:
        batch = self._batch
        if batch is None:
            batch = self._batch = _DecodeBatch.build(self.running, self.device)
        kv_len = max(s.total_len for s in self.running)  # the newest token sits at total_len - 1
        if self.fast_decoder is not None:
            logits = self.fast_decoder(batch.input_ids, batch.positions, batch.slots, kv_len,
                                       batch.shared)  # [R, 1, V]
        else:
            logits = self.model(batch.input_ids, position_ids=batch.positions, kv_cache=self.cache,
                                cache_slots=batch.slots, logits_to_keep=1, kv_len=kv_len).logits
        logits = logits[:, -1].float()  # [R, V]
        tokens = self._sample(logits, self.running, batch.sampler, batch.slots)
        batch.input_ids = tokens[:, None]
        batch.positions = batch.positions + 1
        return self._record(self.running, tokens.tolist())

    # ---- admission and prefill --------------------------------------------------------------------
    def _admit(self) -> list[_Sequence]:
        """Move waiting sequences into free slots, within the padded prefill token budget."""
        admitted: list[_Sequence] = []
        longest = 0
        while self.waiting and self.free_slots:
            longest_next = max(longest, len(self.waiting[0].request.prompt_ids))
            if admitted and longest_next * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            admitted.append(seq)
            longest = longest_next
        return admitted

    def _prefill(self, seqs: list[_Sequence]) -> list[TokenEvent]:
        leaders: list[_Sequence] = []
        row_of: list[int] = []  # each admitted sequence's row among the prefilled ones
        for seq in seqs:
            same = next((i for i, lead in enumerate(leaders) if _same_input(lead.request, seq.request)), None)
            if same is None:
                row_of.append(len(leaders))
                leaders.append(seq)
            else:
                row_of.append(same)
                seq.same_prompt_as = leaders[same]
        logits = self._prefill_rows(leaders)[row_of]  # [G, V]
        for seq in seqs:
            if seq.same_prompt_as is not None:
                self.cache.copy(seq.same_prompt_as.slot, seq.slot, len(seq.request.prompt_ids))
        if any(s.request.params.repetition_penalty != 1.0 for s in seqs):
            self._mark_prompts(seqs)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)
        sampler = BatchSampler([s.request.params for s in seqs], [s.generator for s in seqs], self.device)
        tokens = self._sample(logits, seqs, sampler, slots)
        self.running.extend(seqs)
        self._batch = None
        return self._record(seqs, tokens.tolist())

    def _prefill_rows(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Encode and prefill the prompts of `seqs` into their slots in one forward; their last logits [G, V]."""
        prompts = [s.request.prompt_ids for s in seqs]
        t = max(len(p) for p in prompts)
        ids = [[self.pad_token_id] * (t - len(p)) + list(p) for p in prompts]
        positions = [list(range(len(p), t)) + list(range(len(p))) for p in prompts]  # pads after the prompt
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [G, T]
        position_ids = torch.tensor(positions, dtype=torch.long, device=self.device)  # [G, T]
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)
        features = encode_images(self.model, [s.request for s in seqs], cache=self.encoder_cache)
        out = self.model(input_ids, position_ids=position_ids, image_hidden_states=features,
                         kv_cache=self.cache, cache_slots=slots, logits_to_keep=1, kv_len=t)
        return out.logits[:, -1].float()  # [G, V]: every row's last real token is the last column

    def _mark_prompts(self, seqs: list[_Sequence]) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        for s in seqs:
            self.seen[s.slot] = False
            prompt = torch.tensor(s.request.prompt_ids, dtype=torch.long, device=self.device)
            self.seen[s.slot, prompt.clamp(max=self.vocab_size - 1)] = True

    # ---- shared by both -------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence], sampler: BatchSampler,
                slots: torch.Tensor | None) -> torch.Tensor:
        """Ban stop ids of rows below min_new_tokens, apply the row settings, draw; tokens [R] on device."""
        banned = [(i, sorted(s.stop_ids)) for i, s in enumerate(seqs)
                  if len(s.generated) < s.request.params.min_new_tokens]
        if banned:
            ban_tokens(logits, [i for i, _ in banned], [ids for _, ids in banned])
        seen = None
        if sampler.use_penalty and self.seen is not None:
            seen = self.seen if slots is None else self.seen[slots]
            seen = seen[:len(seqs)]
        tokens = sampler(logits, seen)
        if self.seen is not None:
            rows = torch.arange(len(seqs), device=self.device) if slots is None else slots
            self.seen[rows, tokens] = True
        return tokens

    def _record(self, seqs: list[_Sequence], tokens: list[int]) -> list[TokenEvent]:
        events, finished = [], []
        for seq, token in zip(seqs, tokens):
            seq.generated.append(token)
            p = seq.request.params
            reason = finish_reason(seq.generated, seq.stop_ids, p.max_new_tokens, seq.total_len,
                                   self.max_seq_len, seq.request.stop)
            events.append(TokenEvent(seq.id, token, reason))
            if reason is not None:
                finished.append(seq)
        if finished:
            self._retire(finished)
        return events

    def _retire(self, seqs: list[_Sequence]) -> None:
        gone = {s.id for s in seqs}
        self.running = [s for s in self.running if s.id not in gone]
        for s in seqs:
            self.free_slots.append(s.slot)
            s.slot = -1
        self._batch = None


@dataclass
class _DecodeBatch:
    """Device-side state of the running batch, kept across steps while its membership is unchanged."""

    input_ids: torch.Tensor  # [R, 1] the newest token of each row (not yet in the cache)
    positions: torch.Tensor  # [R, 1] where that token goes
    slots: torch.Tensor | None  # [R] cache rows; None when they are 0..R-1 (the cache is then read as a view)
    sampler: BatchSampler
    shared: torch.Tensor | None  # [R, 2] (slot, length) where a row's prompt is read from; None if nowhere

    @classmethod
    def build(cls, seqs: list[_Sequence], device: torch.device) -> _DecodeBatch:
        def col(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        slot_list = [s.slot for s in seqs]
        slots = None if slot_list == list(range(len(seqs))) else col(slot_list)
        running = {id(s) for s in seqs}
        shared = [(s.same_prompt_as.slot, len(s.request.prompt_ids))
                  if s.same_prompt_as is not None and id(s.same_prompt_as) in running else (s.slot, 0) for s in seqs]
        return cls(input_ids=col([s.generated[-1] for s in seqs])[:, None],
                   positions=col([s.total_len - 1 for s in seqs])[:, None],
                   slots=slots,
                   sampler=BatchSampler([s.request.params for s in seqs], [s.generator for s in seqs], device),
                   shared=None if all(n == 0 for _, n in shared) else torch.tensor(shared, dtype=torch.long))


def _same_input(a: Request, b: Request) -> bool:
    """Whether two requests have the same prompt and images (so one prefill serves both)."""
    if len(a.prompt_ids) != len(b.prompt_ids) or list(a.prompt_ids) != list(b.prompt_ids):  # lists or tensors
        return False
    for x, y in ((a.pixel_values, b.pixel_values), (a.pixel_attention_mask, b.pixel_attention_mask),
                 (a.image_hidden_states, b.image_hidden_states)):
        if (x is None) != (y is None) or (x is not None and (x.shape != y.shape or not torch.equal(x, y))):
            return False
    return True


# ---- images -----------------------------------------------------------------------------------------
def _check_images(request: Request, image_token_id: int, image_seq_len: int) -> None:
    n_tokens = sum(1 for t in request.prompt_ids if t == image_token_id)
    frames = request.image_hidden_states if request.image_hidden_states is not None else request.pixel_values
    n_frames = 0 if frames is None else frames.shape[0]
    if n_tokens != n_frames * image_seq_len:
        raise ValueError(f"the prompt has {n_tokens} <image> tokens but {n_frames} image frames were given "
                         f"({image_seq_len} tokens per frame); build prompts and pixels with the processor")


def encode_images(model: Idefics3, requests: list[Request], max_frames: int | None = None,
                  cache: EncoderCache | None = None) -> torch.Tensor | None:
    """Image features of the requests, concatenated in request order: [sum N, S_img, D_text] or None.

    Frames of equal size from all requests are encoded together, in chunks of at most max_frames: by default
    4 on a CPU, which keeps the encoder's activations small (13 frames of 512 px on SmolVLM-256M's encoder, 2
    threads: 170 MB less transient memory than one call, and 5% faster), and 64 on an accelerator. With a
    cache, a request whose frames were encoded before reuses those features.
    """
    if max_frames is None:
        max_frames = 4 if model.device.type == "cpu" else 64
    parts: list[torch.Tensor | None] = []
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
    keys: dict[int, tuple] = {}
    for i, r in enumerate(requests):
        if r.image_hidden_states is None and cache is not None and r.pixel_values is not None \
                and r.pixel_values.shape[0] > 0:
            keys[i] = cache.key(model, r.pixel_values, r.pixel_attention_mask)
            hit = cache.get(keys[i])
            if hit is not None:
                parts.append(hit)
                continue
        if r.image_hidden_states is not None:
            parts.append(r.image_hidden_states.to(model.device))
        elif r.pixel_values is not None and r.pixel_values.shape[0] > 0:
            parts.append(None)
            pending.setdefault(tuple(r.pixel_values.shape[1:]), []).append(
                (i, r.pixel_values, r.pixel_attention_mask))
        else:
            parts.append(None)
    for group in pending.values():
        frames = torch.cat([pv for _, pv, _ in group]).to(model.device)  # [N, 3, H, W]
        masks = None
        if any(m is not None for _, _, m in group):  # a request without a mask has every pixel valid
            masks = torch.cat([m if m is not None else torch.ones(pv.shape[0], *pv.shape[2:], dtype=torch.bool)
                               for _, pv, m in group]).to(model.device)  # [N, H, W]
        chunks = [model.get_image_features(frames[j:j + max_frames][None],
                                           None if masks is None else masks[j:j + max_frames][None])
                  for j in range(0, frames.shape[0], max_frames)]
        features = torch.cat(chunks)  # [N, S, D]
        offset = 0
        for i, pv, _ in group:
            parts[i] = features[offset:offset + pv.shape[0]]
            offset += pv.shape[0]
            if i in keys:
                cache.put(keys[i], parts[i].clone())  # a copy: the batch's features tensor can then be freed
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None
