"""The training forward: summed next-token cross-entropy over the labelled positions only.

`TokenLoss` wraps the model (it is what DDP or FSDP wraps) and runs the model's own pieces: `embed` (the same
function `forward` and the engine's prefill use: token embeddings with the image features merged in), the
decoder, and `next_token_loss` (the same loss as `forward(labels=...)`), which applies the output head only
where a label exists instead of producing [B, T, V] logits for every position: with the loss on the
assistant's answers that is a few dozen rows instead of thousands, which saves most of the head's time and
memory. It returns the *sum* of the token losses; the loop divides by the number of labelled tokens in the
whole optimiser step (over accumulation and ranks), so the update does not depend on how a step is split
into micro-batches or processes.

Under FSDP every rank must run the same modules in the same order (each sharded layer all-gathers its weights),
so with `always_run_vision` a batch without images still runs the vision tower on one dummy frame and adds
0 × its output to the embeddings (where real image features enter, so that the backward pass also reaches the
layers in the same order on every rank): same collectives everywhere, zero gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.idefics3 import next_token_loss


class TokenLoss(nn.Module):
    """batch -> sum of the cross-entropy of every labelled next token (fp32)."""

    def __init__(self, model: nn.Module, always_run_vision: bool = False) -> None:
        super().__init__()
        self.model = model
        self.always_run_vision = always_run_vision

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor | None = None,
                pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        embeds, _ = m.embed(input_ids, pixel_values, pixel_attention_mask)  # [B, T, D]
        if pixel_values is None and self.always_run_vision:
            size = m.config.vision_config.image_size
            dummy = m.get_image_features(torch.ones(1, 1, 3, size, size, device=input_ids.device))
            embeds = embeds + dummy.sum().to(embeds.dtype) * 0.0
        hidden = m.model.text_model(embeds, None, attention_mask)  # [B, T, D]; right padding: positions 0..L-1
        return next_token_loss(hidden, labels, m.lm_head, reduction="sum")
