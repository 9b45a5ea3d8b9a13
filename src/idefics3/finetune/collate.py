"""Examples -> a padded training batch. Training pads on the right (generation pads on the left).

Right padding keeps every real token at positions 0..L-1, so no position ids are needed and the causal mask
plus the padding mask are all the model sees. Labels are padded with -100. Images are padded the way the
processor pads a batch: frames to the largest height and width (bottom/right, with a zero pixel mask), and
samples with fewer frames get all-zero frames, which the model drops. A batch without any image has no pixels.

Shapes: input_ids, attention_mask, labels [B, T] int64; pixel_values [B, N, 3, H, W] float32;
pixel_attention_mask [B, N, H, W] int64.
"""

from __future__ import annotations

import torch

from .encode import IGNORE, Example


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into one right-padded batch."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    b, t = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with_images = [e for e in examples if e.pixel_values is not None]
    if with_images:
        frames = max(e.pixel_values.shape[0] for e in with_images)
        height = max(e.pixel_values.shape[2] for e in with_images)
        width = max(e.pixel_values.shape[3] for e in with_images)
        pixel_values = torch.zeros((b, frames, 3, height, width), dtype=torch.float32)
        pixel_mask = torch.zeros((b, frames, height, width), dtype=torch.long)
        for i, e in enumerate(examples):
            if e.pixel_values is None:
                continue
            n, _, h, w = e.pixel_values.shape
            pixel_values[i, :n, :, :h, :w] = torch.from_numpy(e.pixel_values)
            pixel_mask[i, :n, :h, :w] = torch.from_numpy(e.pixel_attention_mask.astype("int64"))
        batch["pixel_values"] = pixel_values
        batch["pixel_attention_mask"] = pixel_mask
    return batch


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens of the batch the loss predicts (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
