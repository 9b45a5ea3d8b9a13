"""idefics3: a from-scratch PyTorch implementation of the Idefics3 / SmolVLM vision-language models.

The public names are re-exported here lazily, so that `import idefics3` stays cheap (the CLI starts fast)
and each concept lives in its own module.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The built-in tiny model (src/idefics3/demo/model; its training recipe is recipes/demo/ in the repository):
# every command's default --model.
DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "model"

_EXPORTS = {
    "Idefics3Config": "idefics3.config",
    "VisionConfig": "idefics3.config",
    "TextConfig": "idefics3.config",
    "ConfigError": "idefics3.config",
    "Idefics3ForConditionalGeneration": "idefics3.loading",
    "Idefics3": "idefics3.model.idefics3",
    "Idefics3Output": "idefics3.model.idefics3",
    "load_model": "idefics3.loading",
    "load_processor": "idefics3.loading",
    "resolve_model": "idefics3.loading",
    "ask": "idefics3.loading",
    "install_backend": "idefics3.kernels.backend",
    "Backend": "idefics3.kernels.backend",
    "KVCache": "idefics3.model.kv_cache",
    "WeightsError": "idefics3.weights",
    "ModelNotFoundError": "idefics3.hub",
    "resolve_model_path": "idefics3.hub",
    "Idefics3Processor": "idefics3.processing.processor",
    "BatchFeature": "idefics3.processing.batch",
    "load_image": "idefics3.processing.load",
    "ImageLoadError": "idefics3.processing.load",
    "GenerationConfig": "idefics3.generation.config",
    "TextIteratorStreamer": "idefics3.generation.streamer",
    "Engine": "idefics3.generation.engine",
    "Request": "idefics3.generation.sequence",
    "SamplingParams": "idefics3.generation.sampling",
}
# Drop-in names of the model card's snippet.
_ALIASES = {"AutoProcessor": "Idefics3Processor", "AutoModelForVision2Seq": "Idefics3ForConditionalGeneration",
            "AutoModelForImageTextToText": "Idefics3ForConditionalGeneration"}

__all__ = sorted([*_EXPORTS, *_ALIASES])


def __getattr__(name: str) -> Any:
    target = _ALIASES.get(name, name)
    if target not in _EXPORTS:
        raise AttributeError(f"module 'idefics3' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[target]), target)
    globals()[name] = value
    return value
