"""Gradient (activation) checkpointing applied from outside the model.

`enable` replaces every vision-encoder and decoder layer by a view (model/replace.py: a subclass over the same
parameters, names and hooks) whose `forward` runs the original one under `torch.utils.checkpoint`
(non-reentrant, which works with a frozen vision tower and with LoRA) whenever gradients are being recorded;
parameter names and checkpoint keys do not change. It returns the `Replacements` record; `disable` undoes it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.replace import Replacements, replace_modules, view_as


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that are recomputed: every vision encoder layer and every decoder layer."""
    return [*model.model.vision_model.encoder.layers, *model.model.text_model.layers]


class Recomputed(nn.Module):
    """Mixed in before a layer's class: its forward, recomputed in the backward pass while training."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        run = super().forward
        if torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return run(*args, **kwargs)


@functools.cache
def recomputed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The `Recomputed` subclass of a layer class (one per class)."""
    return type(f"Recomputed{cls.__name__}", (Recomputed, cls), {})


def enable(model: nn.Module) -> Replacements:
    layers = {id(layer) for layer in checkpointed_layers(model)}

    def choose(name: str, module: nn.Module) -> nn.Module | None:
        if id(module) not in layers or isinstance(module, Recomputed):
            return None
        return view_as(module, recomputed_class(type(module)))

    return replace_modules(model, choose)


def disable(record: Replacements) -> None:
    record.undo()
