"""`model.generate(**inputs, ...)`: transformers' generate contract as a thin loop over the Engine.

It takes what the processor returns (input_ids and attention_mask left padded, pixel_values
[B, N, 3, H, W] with all-zero padding frames, pixel_attention_mask) and returns prompt + new ids
[B, T + new] like transformers: rows that finish early are filled with the pad id, and generation
ends when every row has finished. Settings come from the checkpoint's generation_config.json
(plus `<end_of_utterance>`, see config.py) overridden by keyword arguments.

Every row goes into the engine as its own sequence (prompt without padding, its own frames, its own
generator when a seed is given), so a row gets the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..compat import drop_neutral
from .config import GenerationConfig
from .encoder_cache import EncoderCache
from .engine import Engine, Request
from .sampling import SamplingParams
from .stopping import StopStrings

if TYPE_CHECKING:  # the network class, for type hints only
    from ..model.idefics3 import Idefics3

# transformers arguments that are accepted when they ask for what this generate does anyway
_NEUTRAL = {"use_cache": True, "num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False,
            "output_scores": False, "output_logits": False, "output_attentions": False,
            "output_hidden_states": False, "synced_gpus": False, "assistant_model": None,
            "logits_processor": None, "stopping_criteria": None}


def generate(model: Idefics3, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, pixel_attention_mask: torch.Tensor | None = None,
             image_hidden_states: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
             *, streamer: Any | None = None, callback: Callable[[int, int], None] | None = None,
             tokenizer: Any | None = None, seed: int | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             encoder_cache: EncoderCache | None | bool = True, **settings: Any) -> torch.Tensor:
    """Generate continuations of a batch of prompts; returns LongTensor [B, T + new] (prompt + new ids).

    Args:
        input_ids, attention_mask: [B, T] prompts, left padded (as the processor makes them).
        pixel_values, pixel_attention_mask: [B, N, 3, H, W] / [B, N, H, W]; row b uses as many leading
            frames as its `<image>` tokens need, the rest being the processor's zero padding.
        image_hidden_states: precomputed image features [N_total, S, D] instead of pixels.
        generation_config: replaces the checkpoint's defaults; keyword settings override either.
        streamer: gets `put(prompt_ids)`, `put(new_token)` ... `end()`, as in transformers (batch size 1).
        callback: called as callback(row, token_id) for every new token of every row.
        tokenizer: needed for stop_strings (anything with `decode`).
        seed: seeds a torch.Generator per row (each row draws what it would draw alone).
        generator: one generator shared by all rows (drawn in row order), or one per row.
        encoder_cache: True (the default) uses the model's `encoder_cache` (image features keyed by the pixels'
            content, so a second question about the same image skips the vision encoder); False disables it;
            or pass an EncoderCache to share one explicitly.
        **settings: GenerationConfig fields: max_new_tokens, max_length, min_new_tokens, do_sample,
            temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id, pad_token_id, stop_strings.
    """
    config = _resolve_config(model, generation_config, settings)
    if input_ids is None:
        raise ValueError("generate needs input_ids (use the processor to build them)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    if streamer is not None and b != 1:
        raise ValueError(f"a streamer follows one sequence, but the batch has {b} rows")
    rows = _unpad(input_ids, attention_mask)
    max_new = config.max_new_tokens_for(t, model.config.text_config.max_position_embeddings)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new == 0:
        if streamer is not None:
            streamer.end()
        return input_ids
    frames = _frames_per_row(model, rows, pixel_values, pixel_attention_mask, image_hidden_states)
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    generators = _generators(generator, b)
    engine = Engine(model, max_batch=b, max_seq_len=max(len(r) for r in rows) + max_new,
                    eos_token_ids=config.eos_token_id, max_prefill_tokens=1 << 62,
                    pad_token_id=config.resolved_pad_token_id, encoder_cache=_encoder_cache(model, encoder_cache))
    for i, prompt in enumerate(rows):
        params = _sampling_params(config, max_new, seed)
        pv, pm, feats = frames[i]
        engine.add(Request(prompt, params, pixel_values=pv, pixel_attention_mask=pm, image_hidden_states=feats,
                           stop=stop, generator=generators[i]))
    new: list[list[int]] = [[] for _ in range(b)]
    while engine.has_work():
        for event in engine.step():
            new[event.seq_id].append(event.token_id)
            if streamer is not None:
                streamer.put(torch.tensor([event.token_id]))
            if callback is not None:
                callback(event.seq_id, event.token_id)
    if streamer is not None:
        streamer.end()
    return _assemble(input_ids, new, config.resolved_pad_token_id)


def _encoder_cache(model: Idefics3, choice: EncoderCache | None | bool) -> EncoderCache | None:
    """The cache to use: the one passed, none, or (True) the model's own `encoder_cache` if it has one."""
    if isinstance(choice, EncoderCache):
        return choice
    if choice is None or choice is False:
        return None
    return getattr(model, "encoder_cache", None)


def _resolve_config(model: Idefics3, base: GenerationConfig | None, settings: dict[str, Any]) -> GenerationConfig:
    drop_neutral("generate", settings, _NEUTRAL)
    if base is None:
        base = getattr(model, "generation_config", None)
        if not isinstance(base, GenerationConfig):
            base = GenerationConfig.for_model(model)
            try:
                model.generation_config = base  # read the json once per model, as transformers does
            except AttributeError:
                pass
    config = base.update(**settings)
    config.validate()
    return config


def _sampling_params(config: GenerationConfig, max_new: int, seed: int | None) -> SamplingParams:
    if not config.do_sample:
        return SamplingParams(temperature=0.0, repetition_penalty=config.repetition_penalty, max_new_tokens=max_new,
                              min_new_tokens=config.min_new_tokens, stop_token_ids=tuple(config.eos_token_id))
    return SamplingParams(temperature=config.temperature, top_k=config.top_k or 0, top_p=config.top_p,
                          min_p=config.min_p or 0.0, repetition_penalty=config.repetition_penalty, seed=seed,
                          max_new_tokens=max_new, min_new_tokens=config.min_new_tokens,
                          stop_token_ids=tuple(config.eos_token_id))


def _unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's real prompt ids (the positions where attention_mask is 1)."""
    ids = input_ids.tolist()
    if attention_mask is None:
        return ids
    keep = attention_mask.bool().tolist()
    rows = [[t for t, k in zip(row, mask) if k] for row, mask in zip(ids, keep)]
    if any(not r for r in rows):
        raise ValueError("a row of the batch has an all-zero attention_mask (an empty prompt)")
    return rows


def _frames_per_row(model: Idefics3, rows: list[list[int]], pixel_values: torch.Tensor | None,
                    pixel_attention_mask: torch.Tensor | None, image_hidden_states: torch.Tensor | None
                    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """Split the batch's images per row: the leading frames each row's <image> tokens call for."""
    image_token, per_frame = model.config.image_token_id, model.config.image_seq_len
    counts = [sum(1 for t in r if t == image_token) for r in rows]
    if any(c % per_frame for c in counts):
        raise ValueError(f"<image> tokens per row {counts} are not multiples of {per_frame} (tokens per frame)")
    needed = [c // per_frame for c in counts]
    if image_hidden_states is not None:
        if pixel_values is not None:
            raise ValueError("pass either pixel_values or image_hidden_states, not both")
        offsets = [sum(needed[:i]) for i in range(len(rows) + 1)]
        if offsets[-1] != image_hidden_states.shape[0]:
            raise ValueError(f"the prompts need {offsets[-1]} frames but image_hidden_states has "
                             f"{image_hidden_states.shape[0]}")
        return [(None, None, image_hidden_states[offsets[i]:offsets[i + 1]] if needed[i] else None)
                for i in range(len(rows))]
    if pixel_values is None:
        if any(needed):
            raise ValueError("the prompts have <image> tokens but no pixel_values were given")
        return [(None, None, None)] * len(rows)
    if pixel_values.dim() == 4:
        pixel_values = pixel_values[None]
        pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask[None]
    if pixel_values.shape[0] != len(rows):
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but input_ids has {len(rows)}")
    out = []
    for i, n in enumerate(needed):
        if n > pixel_values.shape[1]:
            raise ValueError(f"row {i} has <image> tokens for {n} frames but pixel_values holds "
                             f"{pixel_values.shape[1]}")
        mask = None if pixel_attention_mask is None or n == 0 else pixel_attention_mask[i, :n]
        out.append((pixel_values[i, :n] if n else None, mask, None))
    return out


def _generators(generator: torch.Generator | list[torch.Generator] | None, b: int
                ) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * b
    if len(generator) != b:
        raise ValueError(f"got {len(generator)} generators for a batch of {b}")
    return list(generator)


def _assemble(input_ids: torch.Tensor, new: list[list[int]], pad_id: int) -> torch.Tensor:
    """prompt + new ids, finished rows padded with pad_id to the longest row: [B, T + max new]."""
    width = max(len(n) for n in new)
    out = torch.full((len(new), width), pad_id, dtype=torch.long)
    for i, n in enumerate(new):
        out[i, :len(n)] = torch.tensor(n, dtype=torch.long)
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
