"""Test helpers: install one kernel family on a model, as the backend does, and count what changed."""

from __future__ import annotations

from torch import nn

from idefics3.kernels.cpu_attention import LimitsMemo
from idefics3.kernels.cpu_text import text_replacement
from idefics3.kernels.cpu_vision import VisionKernels, vision_replacement
from idefics3.kernels.derived import DerivedWeights
from idefics3.model.replace import replace_modules


def fuse_text(model: nn.Module) -> int:
    """Give the decoder attention the prefill kernel; returns how many modules changed."""
    return len(replace_modules(model, text_replacement(LimitsMemo())))


def fuse_vision(model: nn.Module, kernels: VisionKernels | None = None) -> int:
    """Fuse the vision encoder (attention kernel on); returns how many modules changed."""
    kernels = kernels or VisionKernels(DerivedWeights(), attention_kernel=True)
    return len(replace_modules(model, vision_replacement(kernels)))
