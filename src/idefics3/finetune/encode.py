"""One conversation -> token ids, loss labels and pixels: where the training signal is decided.

The conversation is rendered with the processor's chat template. Assistant turns are located by rendering
prefixes: the text up to turn k with the generation prompt ("...Assistant:") and the text through turn k. What
lies between, up to and including the turn's `<end_of_utterance>`, is the trained span ("assistant" mode, what
the original authors trained: the answer with its leading space and its end-of-utterance, not the newline after
it). "all" mode (the HF notebooks' behaviour) trains every token. In both modes the expansion of every `<image>`
(tile markers, `<global-img>`, `<fake_token_around_image>`, image tokens and the newlines between tiles) and
padding never count.

Images are loaded and tiled by the processor; each placeholder is expanded as the processor expands it, the
character spans are carried through the expansion, and the text is tokenized once with offsets, so labels follow
the exact ids the processor produces. Failures of a single row raise `BadRow`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..processing import chat_template as templates
from ..processing.load import ImageLoadError, load_image
from ..processing.processor import Idefics3Processor
from ..processing.prompt import image_prompt
from .data import BadRow, Conversation

IGNORE = -100
LOSS_MODES = ("assistant", "all")
_ROW_COL = re.compile(r"^<row_\d+_col_\d+>$")


@dataclass
class Example:
    """One tokenized conversation. input_ids/labels [T]; pixel_values [N, 3, H, W]; pixel_attention_mask [N, H, W]."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: np.ndarray | None = None
    pixel_attention_mask: np.ndarray | None = None

    @property
    def num_label_tokens(self) -> int:
        """Tokens that are predicted by the loss (a label at position t is predicted from position t-1)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def never_trained_ids(processor: Idefics3Processor) -> set[int]:
    """Ids that never carry loss: image, fake-image, global-image, tile-marker and padding tokens."""
    tok = processor.tokenizer
    ids = {processor.image_token_id, processor.fake_image_token_id}
    for token in [processor.global_image_token, *tok.backend.get_vocab()]:
        if token == processor.global_image_token or _ROW_COL.match(token):
            value = tok.convert_tokens_to_ids(token)
            if value is not None:
                ids.add(value)
    if tok.pad_token_id is not None:
        ids.add(tok.pad_token_id)
    return ids


def _within(starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Tokens overlapping [lo, hi) (zero-width tokens: starting inside it)."""
    return ((ends > lo) & (starts < hi)) | ((starts == ends) & (starts >= lo) & (starts < hi))


class ConversationEncoder:
    """Callable: messages -> Example, with the processor's template, tokenizer and image settings."""

    def __init__(self, processor: Idefics3Processor, loss_on: str = "assistant", max_length: int | None = None,
                 chat_template: str | None = None) -> None:
        if loss_on not in LOSS_MODES:
            raise ValueError(f"loss_on must be one of {LOSS_MODES}, got {loss_on!r}")
        self.processor = processor
        self.loss_on = loss_on
        self.max_length = max_length
        self.template = templates.resolve_chat_template(processor.chat_template, chat_template)
        self.variables = dict(processor.tokenizer.special_tokens_map)
        self.never = np.array(sorted(never_trained_ids(processor)), dtype=np.int64)
        self.end_of_utterance = processor.end_of_utterance_token
        self.bos = processor.tokenizer.bos_token

    def _render(self, messages: Conversation, add_generation_prompt: bool = False) -> str:
        return templates.render([messages], self.template, add_generation_prompt=add_generation_prompt,
                                **self.variables)[0]

    def assistant_spans(self, messages: Conversation, text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of each assistant answer (through its end-of-utterance) in `text`."""
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prefix = self._render(messages[:k], add_generation_prompt=True)
            through = self._render(messages[:k + 1])
            if not (through.startswith(prefix) and text.startswith(through)):
                raise ValueError("the chat template does not render conversations prefix by prefix, so assistant "
                                 "turns cannot be located; use loss_on='all'")
            end = through.rfind(self.end_of_utterance, len(prefix))
            end = end + len(self.end_of_utterance) if end >= 0 else len(through.rstrip())
            spans.append((len(prefix), end))
        return spans

    def _images(self, messages: Conversation) -> list[Any]:
        sources = templates.collect_images([messages])[0]
        images = []
        for src in sources:
            try:
                images.append(load_image(src, timeout=self.processor.load_timeout,
                                         max_pixels=self.processor.max_pixels))
            except ImageLoadError as err:
                reason = "missing image" if "not an existing file" in str(err) else "undecodable image"
                raise BadRow(reason, str(err)) from err
        return images

    def __call__(self, messages: Conversation) -> Example:
        try:
            conversations, batched = templates.normalize_conversations(messages)
        except (TypeError, ValueError) as err:
            raise BadRow("bad format", str(err)) from err
        if batched:
            raise BadRow("bad format", "'messages' must be one conversation, not a list of conversations")
        messages = conversations[0]
        if not any(m.get("role") == "assistant" for m in messages):
            raise BadRow("no assistant turn")
        text = self._render(messages)
        spans = self.assistant_spans(messages, text) if self.loss_on == "assistant" else [(0, len(text))]
        images = self._images(messages)
        placeholder = self.processor.image_token
        positions = [m.start() for m in re.finditer(re.escape(placeholder), text)]
        if len(positions) != len(images):
            raise BadRow("bad format", f"{len(positions)} {placeholder} placeholders in the text but "
                                       f"{len(images)} images (write images as image content parts)")
        pixels: dict[str, Any] = {}
        grids: list[tuple[int, int]] = []
        if images:
            try:
                pixels, per_sample = self.processor.process_images([images])
            except ImageLoadError as err:
                raise BadRow("undecodable image", str(err)) from err
            grids = per_sample[0]
        expanded, spans, image_regions = self._expand(text, positions, grids, spans)
        return self._tokenize(expanded, spans, image_regions, pixels, len(grids))

    def _expand(self, text: str, positions: list[int], grids: list[tuple[int, int]], spans: list[tuple[int, int]]
                ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """Expand each placeholder; map the spans into the expanded text and return the expansions' regions."""
        width = len(self.processor.image_token)
        pieces, regions, shifts = [], [], []  # shifts: (original position, cumulative growth after it)
        cursor, growth = 0, 0
        for pos, (rows, cols) in zip(positions, grids):
            block = image_prompt(rows, cols, self.processor.image_seq_len, self.processor.tokens)
            pieces += [text[cursor:pos], block]
            regions.append((pos + growth, pos + growth + len(block)))
            growth += len(block) - width
            shifts.append((pos + width, growth))
            cursor = pos + width
        pieces.append(text[cursor:])

        def moved(p: int) -> int:
            return p + max((g for q, g in shifts if q <= p), default=0)

        return "".join(pieces), [(moved(a), moved(b)) for a, b in spans], regions

    def _tokenize(self, text: str, spans: list[tuple[int, int]], image_regions: list[tuple[int, int]],
                  pixels: dict[str, Any], n_images: int) -> Example:
        add_special = not (self.bos is not None and text.startswith(self.bos))
        encoding = self.processor.tokenizer.backend.encode(text, add_special_tokens=add_special)
        ids = np.array(encoding.ids, dtype=np.int64)
        offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        if self.max_length is not None and len(ids) > self.max_length:
            raise BadRow("too long", f"{len(ids)} tokens after image expansion > max_length {self.max_length}")
        trained = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            trained |= _within(starts, ends, lo, hi)
        for lo, hi in image_regions:
            trained &= ~((starts >= lo) & (ends <= hi))
        trained &= ~np.isin(ids, self.never)
        frames = 0 if not n_images else int(pixels["pixel_values"].shape[1])
        if int((ids == self.processor.image_token_id).sum()) != frames * self.processor.image_seq_len:
            raise BadRow("bad format", "image tokens in the text do not match the image frames "
                                       "(does the text contain a literal image token?)")
        labels = np.where(trained, ids, IGNORE)
        if not (labels[1:] != IGNORE).any():
            raise BadRow("nothing to train", "no token of the conversation carries loss")
        if n_images:
            return Example(ids.tolist(), labels.tolist(), np.asarray(pixels["pixel_values"][0], dtype=np.float32),
                           np.asarray(pixels["pixel_attention_mask"][0]))
        return Example(ids.tolist(), labels.tolist())
