"""OpenAI messages (or a text prompt) -> what the engine takes: prompt ids, image frames, their digests.

Exactly the processor's rules (the parity of `input_ids` and pixels with transformers is tested for the
processor): the checkpoint's chat template renders the conversation with an `<image>` where each image part
stood, every image is tiled with the checkpoint's settings (or, for `detail: "low"`, kept as one frame), and
each `<image>` is expanded to its grid of tile markers and `image_seq_len` tokens per frame. Images are loaded
under the server's `MediaPolicy` (media.py). Runs on a worker thread, never on the event loop or the engine's
thread, and so does hashing the frames for the prefix and encoder caches.

Limits are checked as early as they can be: the number of images before any is fetched, the number of frames
once they are tiled, the prompt length once it is tokenized. Every refusal is a `PromptError` naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..generation.encoder_cache import frame_digests
from ..processing.processor import Idefics3Processor
from ..processing.prompt import expand_prompts
from .media import MediaPolicy, load_image_url
from .protocol import Message


class PromptError(ValueError):
    """A request whose prompt cannot be built; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_images: int = 8           # per request
    max_frames: int = 64          # image tiles per request (17 per image at most with the default tiling)
    max_prompt_tokens: int = 8192


@dataclass
class Prompt:
    ids: list[int]
    pixel_values: torch.Tensor | None = None          # [N, 3, H, W]
    pixel_attention_mask: torch.Tensor | None = None  # [N, H, W]
    frame_keys: list[str] | None = None
    n_images: int = 0


class PromptBuilder:
    def __init__(self, processor: Idefics3Processor, policy: MediaPolicy, limits: Limits) -> None:
        self.processor = processor
        self.policy = policy
        self.limits = limits

    # ---- chat ---------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> Prompt:
        conversation, images = self._template_messages(messages)
        try:
            text = self.processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        except ValueError as err:  # the template refused the conversation (raise_exception, a missing part)
            raise PromptError(f"messages: {err}", "messages") from err
        loaded = [load_image_url(url, self.policy, index=i) for i, (url, _) in enumerate(images)]
        return self._build(text, loaded, [detail for _, detail in images])

    def _template_messages(self, messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        conversation, images = [], []
        for m, message in enumerate(messages):
            parts = message.content if isinstance(message.content, list) else None
            if parts is None:
                conversation.append({"role": message.role, "content": [{"type": "text", "text": message.content}]})
                continue
            content = []
            for p, part in enumerate(parts):
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                else:
                    if message.role != "user":
                        raise PromptError(f"messages[{m}].content[{p}]: images are only accepted in user messages",
                                          f"messages[{m}].content[{p}]")
                    images.append((part.image_url.url, part.image_url.detail))
                    content.append({"type": "image"})
            conversation.append({"role": message.role, "content": content})
        if len(images) > self.limits.max_images:
            raise PromptError(f"the request has {len(images)} images; this server accepts at most "
                              f"{self.limits.max_images} per request (--max-images-per-request)", "messages")
        return conversation, images

    # ---- text -------------------------------------------------------------------------------------
    def text(self, prompt: str, add_special_tokens: bool = True) -> Prompt:
        if self.processor.image_token in prompt:
            raise PromptError(f"text prompts cannot hold {self.processor.image_token}; send images to "
                              "/v1/chat/completions", "prompt")
        _check_unicode(prompt, "prompt")
        ids = self.processor.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        return self._checked(Prompt(ids), "prompt")

    # ---- shared -----------------------------------------------------------------------------------
    def _build(self, text: str, images: list[Any], details: list[str]) -> Prompt:
        grids: list[tuple[int, int]] = [(0, 0)] * len(images)
        frames: list[list[np.ndarray]] = [[] for _ in images]
        masks: list[list[np.ndarray]] = [[] for _ in images]
        for low in (False, True):  # one processor call per tiling setting, then frames back in image order
            chosen = [i for i, d in enumerate(details) if (d == "low") == low]
            if not chosen:
                continue
            settings = {"do_image_splitting": False} if low else {}
            pixels, sample_grids = self.processor.process_images([[images[i] for i in chosen]], **settings)
            pv, pm = pixels["pixel_values"][0], pixels["pixel_attention_mask"][0]  # [N, 3, H, W], [N, H, W]
            at = 0
            for i, grid in zip(chosen, sample_grids[0]):
                n = grid[0] * grid[1] + 1 if grid[0] else 1
                grids[i] = grid
                frames[i] = list(pv[at:at + n])
                masks[i] = list(pm[at:at + n])
                at += n
        n_frames = sum(len(f) for f in frames)
        if n_frames > self.limits.max_frames:
            raise PromptError(f"the request's images make {n_frames} tiles; this server accepts at most "
                              f"{self.limits.max_frames} per request (--max-tiles-per-request; detail \"low\" gives "
                              "one tile per image)", "messages")
        expanded = expand_prompts([text], [grids], self.processor.image_seq_len, self.processor.tokens)[0]
        bos = self.processor.tokenizer.bos_token
        add_special = not (bos is not None and expanded.startswith(bos))
        _check_unicode(expanded, "messages")
        ids = self.processor.tokenizer(expanded, add_special_tokens=add_special)["input_ids"]
        prompt = Prompt(ids, n_images=len(images))
        if n_frames:
            prompt.pixel_values, prompt.pixel_attention_mask = _stack([f for fs in frames for f in fs],
                                                                       [m for ms in masks for m in ms])
            prompt.frame_keys = frame_digests(prompt.pixel_values, prompt.pixel_attention_mask)
        return self._checked(prompt, "messages")

    def _checked(self, prompt: Prompt, param: str) -> Prompt:
        if not prompt.ids:
            raise PromptError("the prompt is empty", param)
        if len(prompt.ids) > self.limits.max_prompt_tokens:
            raise PromptError(f"the prompt has {len(prompt.ids)} tokens; this server accepts at most "
                              f"{self.limits.max_prompt_tokens}", param, "context_length_exceeded")
        return prompt


def _check_unicode(text: str, param: str) -> None:
    """JSON's \\ud800 escapes give Python strings that are not Unicode (a lone surrogate); the tokenizer cannot take
    them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PromptError(f"{param} holds {text[err.start:err.end]!r}, a lone UTF-16 surrogate, which is not valid "
                          "Unicode text", param) from err


def _stack(frames: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of possibly different sizes -> [N, 3, H, W] zero-padded to the largest, with masks [N, H, W]
    (the padding the processor gives frames of one batch)."""
    h = max(f.shape[-2] for f in frames)
    w = max(f.shape[-1] for f in frames)
    pv = torch.zeros(len(frames), frames[0].shape[0], h, w, dtype=torch.from_numpy(frames[0]).dtype)
    pm = torch.zeros(len(frames), h, w, dtype=torch.bool)
    for i, (f, m) in enumerate(zip(frames, masks)):
        pv[i, :, :f.shape[-2], :f.shape[-1]] = torch.from_numpy(np.ascontiguousarray(f))
        pm[i, :m.shape[-2], :m.shape[-1]] = torch.from_numpy(np.ascontiguousarray(m)).bool()
    return pv, pm
