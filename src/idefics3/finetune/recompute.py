"""Gradient (activation) checkpointing applied from outside the model.

Each vision-encoder and decoder layer gets an instance-level `forward` that runs the original forward under
`torch.utils.checkpoint` (non-reentrant, which works with a frozen vision tower and with LoRA) whenever
gradients are being recorded; no module is replaced, so parameter names and checkpoint keys do not change.
`disable` restores the class forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that are recomputed: every vision encoder layer and every decoder layer."""
    return [*model.model.vision_model.encoder.layers, *model.model.text_model.layers]


def _wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    recomputed.__wrapped__ = forward  # type: ignore[attr-defined]
    return recomputed


def enable(model: nn.Module) -> None:
    for layer in checkpointed_layers(model):
        if "forward" not in vars(layer):
            layer.forward = _wrap(layer.forward)


def disable(model: nn.Module) -> None:
    for layer in checkpointed_layers(model):
        vars(layer).pop("forward", None)
