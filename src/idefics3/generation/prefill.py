"""Chunked prefill: a new sequence's image frames and prompt go through the model in bounded pieces.

A step of the engine decodes one token of every running sequence and then spends at most one *chunk* of
prefill work on the sequences being admitted: vision-encoder frames first, then prompt tokens. Both are
counted in prompt-token equivalents: a frame costs what its encoder FLOPs would buy in decoder tokens
(`frame_cost`: patches x vision parameters / decoder parameters; about 900 tokens for a 512-px frame of
SmolVLM-256M, 36 for a 364-px frame of Idefics3-8B), and a step always makes some progress. So one request
with a 13-frame image does not freeze fifteen running streams for seconds: they get a token between chunks.

Prompt tokens of several sequences go in one left-padded forward (each row at its own offset in its own
slot): row b holds its chunk's real tokens in its last columns at positions o_b..o_b+c_b-1, its pad columns
first at the positions after them (clamped to the slot's end). Every query attends to its slot's positions
up to its own, so real tokens never see pads, and the pads' junk keys lie beyond the row's tokens, where the
row's next chunk or token overwrites them before any query reaches them. The last column is then every row's
newest real token, whose logits give the first new token when the row's prompt is complete.

Image features are gathered per chunk: the k-th `<image>` token of a prompt is row k % S of frame k // S (S
tokens per frame), so a chunk may start or end inside a frame (after a prefix-cache hit, for instance).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from .encoder_cache import EncoderCache
from .sequence import Sequence

if TYPE_CHECKING:  # the network class, for type hints only
    from ..model.idefics3 import Idefics3
    from ..model.kv_cache import KVCache


def frame_cost(model: Idefics3) -> float:
    """The encoder cost of one frame in decoder-token equivalents (both ~2 FLOPs per parameter and token)."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    n_vision = sum(p.numel() for p in model.model.vision_model.parameters()) + \
        sum(p.numel() for p in model.model.connector.parameters())
    n_text = sum(p.numel() for p in model.model.text_model.layers.parameters())
    return patches * n_vision / max(n_text, 1)


def encode_frames(model: Idefics3, frames: torch.Tensor, masks: torch.Tensor | None,
                  max_frames: int | None = None) -> torch.Tensor:
    """Image features [N, S, D] of frames [N, 3, H, W] (masks [N, H, W]), encoded max_frames at a time.

    By default 4 at a time on a CPU, which keeps the encoder's activations small (13 frames of 512 px on
    SmolVLM-256M's encoder, 2 threads: 170 MB less transient memory than one call, and 5% faster), and 64 on
    an accelerator.
    """
    if max_frames is None:
        max_frames = 4 if model.device.type == "cpu" else 64
    frames = frames.to(model.device)
    masks = None if masks is None else masks.to(model.device)
    chunks = [model.get_image_features(frames[j:j + max_frames][None],
                                       None if masks is None else masks[j:j + max_frames][None])
              for j in range(0, frames.shape[0], max_frames)]
    features = torch.cat(chunks)  # [N, S, D]
    if features.shape[0] != frames.shape[0]:  # get_image_features drops all-zero frames as batch padding
        raise ValueError(f"{frames.shape[0] - features.shape[0]} of {frames.shape[0]} frames are all zeros, which "
                         "the model reads as padding; give the processor's frames of real images only")
    return features


def needed_frames(seq: Sequence, image_seq_len: int) -> range:
    """The frames whose tokens lie at or after the sequence's prefilled positions."""
    done_images = _images_before(seq, seq.prefilled)
    return range(done_images // image_seq_len, len(seq.features))


def _images_before(seq: Sequence, position: int) -> int:
    """How many `<image>` tokens lie before a prompt position."""
    return bisect_left(seq.image_positions, position)


def ready_end(seq: Sequence, image_seq_len: int) -> int:
    """The end of the prompt span after `prefilled` whose image features are all available."""
    for f in needed_frames(seq, image_seq_len):
        if seq.features[f] is None:
            return max(seq.prefilled, seq.image_positions[f * image_seq_len])
    return seq.prompt_len


class FrameEncoder:
    """Encodes the frames the prefilling sequences need, in order, within a cost budget, through the cache."""

    def __init__(self, model: Idefics3, cache: EncoderCache | None, max_frames: int | None = None) -> None:
        self.model = model
        self.cache = cache
        self.max_frames = max_frames
        self.cost = frame_cost(model)
        self.image_seq_len = model.config.image_seq_len

    def attach(self, seq: Sequence) -> None:
        """Give a new sequence its per-frame feature list (precomputed features are ready at once)."""
        r = seq.request
        if r.image_hidden_states is not None:
            feats = r.image_hidden_states.to(self.model.device)
            seq.features = [feats[i] for i in range(feats.shape[0])]
        else:
            seq.features = [None] * r.n_frames

    def encode(self, seqs: list[Sequence], budget: float) -> float:
        """Encode pending frames of `seqs` (first come first) until the budget is spent; returns the cost.

        At least one frame is encoded when any is pending, however small the budget."""
        version = None  # the vision weights' version, read once and only when a frame is looked up
        todo: list[tuple[Sequence, int]] = []
        pending = ((seq, f) for seq in seqs for f in needed_frames(seq, self.image_seq_len)
                   if seq.features[f] is None)
        for seq, f in pending:
            if self.cache is not None:
                version = version or EncoderCache.weights_version(self.model)
                hit = self.cache.get((version, seq.request.frame_keys[f]))
                if hit is not None:
                    seq.features[f] = hit
                    continue
            if todo and (len(todo) + 1) * self.cost > budget:
                break
            todo.append((seq, f))
        groups: dict[tuple[int, ...], list[tuple[Sequence, int]]] = defaultdict(list)
        for seq, f in todo:
            groups[tuple(seq.request.pixel_values.shape[1:])].append((seq, f))
        for group in groups.values():
            frames = torch.stack([s.request.pixel_values[f] for s, f in group])  # [N, 3, H, W]
            masks = None
            if any(s.request.pixel_attention_mask is not None for s, _ in group):
                masks = torch.stack([s.request.pixel_attention_mask[f] if s.request.pixel_attention_mask is not None
                                     else torch.ones(frames.shape[2:], dtype=torch.bool) for s, f in group])
            features = encode_frames(self.model, frames, masks, self.max_frames)  # [N, S, D]
            for (seq, f), feat in zip(group, features):
                seq.features[f] = feat.clone()  # its own storage: the batch's tensor can then be freed
                if self.cache is not None:
                    self.cache.put((version, seq.request.frame_keys[f]), seq.features[f])
        return len(todo) * self.cost


def plan_rows(seqs: list[Sequence], budget: int, image_seq_len: int) -> list[tuple[Sequence, int]]:
    """Which prompt tokens go in this step's forward: (sequence, tokens) rows, padded size within budget."""
    rows: list[tuple[Sequence, int]] = []
    width = 0
    for seq in seqs:
        avail = ready_end(seq, image_seq_len) - seq.prefilled
        if avail <= 0:
            continue
        take = min(avail, max(budget // (len(rows) + 1), 1))
        if rows and max(width, take) * (len(rows) + 1) > budget:
            break
        rows.append((seq, take))
        width = max(width, take)
    return rows


def run_rows(model: Idefics3, cache: KVCache, rows: list[tuple[Sequence, int]], pad_token_id: int
             ) -> torch.Tensor:
    """Prefill each row's next tokens into its slot in one forward; the rows' newest logits [G, V] (fp32)."""
    width = max(n for _, n in rows)
    last = cache.max_seq_len - 1
    ids, positions, feats = [], [], []
    s_img = model.config.image_seq_len
    for seq, n in rows:
        start = seq.prefilled
        ids.append([pad_token_id] * (width - n) + list(seq.request.prompt_ids[start:start + n]))
        positions.append([min(start + n + j, last) for j in range(width - n)] + list(range(start, start + n)))
        k0, k1 = _images_before(seq, start), _images_before(seq, start + n)
        if k1 > k0:
            frames = torch.cat(seq.features[k0 // s_img:(k1 - 1) // s_img + 1])  # [F * S, D]
            offset = (k0 // s_img) * s_img
            feats.append(frames[k0 - offset:k1 - offset])  # [k1 - k0, D]
    device = model.device
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)  # [G, W]
    position_ids = torch.tensor(positions, dtype=torch.long, device=device)  # [G, W]
    slots = torch.tensor([seq.slot for seq, _ in rows], dtype=torch.long, device=device)  # [G]
    features = torch.cat(feats) if feats else None  # [K, D]: row-major order, as the <image> tokens
    kv_len = min(max(seq.prefilled + width for seq, _ in rows), cache.max_seq_len)
    cache.prepare((seq.slot for seq, _ in rows), kv_len)
    out = model(input_ids, position_ids=position_ids, image_hidden_states=features, kv_cache=cache,
                cache_slots=slots, logits_to_keep=1, kv_len=kv_len)
    return out.logits[:, -1].float()  # [G, V]
